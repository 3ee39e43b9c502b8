"""Objects that configs name by reference: `package.module:name` or `path/to/file.py:name`.

Rewards, tools and environments given on the command line or in a YAML file are found this way. A
file is imported once per process under a name derived from its path, so two references to one
file share its module (and its classes stay picklable).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from .errors import MlxRftError


def load_object(spec: str, what: str) -> Any:
    """The object a `package.module:name` or `path/to/file.py:name` reference names."""
    target, _, attr = spec.strip().rpartition(":")
    if not target or not attr.isidentifier():
        raise MlxRftError(
            f"{what} {spec!r} is not a reference; write package.module:name or path/to/file.py:name"
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _load_file(Path(target).expanduser(), spec, what)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise MlxRftError(
                f"{what} {spec!r}: cannot import module {target!r} ({e}); check the name, or use "
                "path/to/file.py:name"
            ) from e
        except Exception as e:  # noqa: BLE001  (user code failing at import)
            raise MlxRftError(f"{what} {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise MlxRftError(
            f"{what} {spec!r}: {target} has no attribute {attr!r}; check the name after the colon"
        )
    return getattr(module, attr)


def _load_file(path: Path, spec: str, what: str):
    if not path.is_file():
        raise MlxRftError(f"{what} {spec!r}: file {str(path)!r} does not exist; check the path")
    name = f"mlx_rft_user_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise MlxRftError(f"{what} {spec!r}: cannot load {path} as a Python module; give it a .py name")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before running it, so dataclasses and pickling find the module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        del sys.modules[name]
        raise MlxRftError(f"{what} {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    return module
