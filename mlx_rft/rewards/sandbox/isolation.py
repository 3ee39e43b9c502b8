"""Which OS isolation this machine allows: new namespaces as root, a user namespace, or none."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import lru_cache

from ...errors import MlxRftError

_NS_FLAGS = ["--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]


def isolation_prefix(mode: str) -> list[str]:
    if mode == "namespaces":
        return ["unshare", *_NS_FLAGS]
    if mode == "userns":
        return ["unshare", "--user", "--map-root-user", *_NS_FLAGS]
    return []


@lru_cache(maxsize=None)
def _probe(mode: str, python: str) -> bool:
    """Whether `mode` works here: the child must see itself as PID 1 with no usable network."""
    if mode == "none":
        return True
    if shutil.which("unshare") is None or (mode == "namespaces" and os.geteuid() != 0):
        return False
    check = (
        "import os, socket\n"
        "s = socket.socket()\n"
        "s.settimeout(1)\n"
        "try:\n s.connect(('127.0.0.1', 9)); net = 'up'\n"
        "except OSError as e:\n net = 'down' if e.errno in (101, 99) else 'up'\n"
        "print(os.getpid(), net)"
    )
    try:
        out = subprocess.run(
            [*isolation_prefix(mode), python, "-I", "-S", "-c", check],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.split() == ["1", "down"]


def detect_isolation(preferred: str = "auto", python: str | None = None) -> str:
    """The isolation mode to use: "namespaces" (root + unshare), "userns", or "none"."""
    python = python or sys.executable
    if preferred != "auto":
        if not _probe(preferred, python):
            raise MlxRftError(
                f"sandbox isolation {preferred!r} does not work on this machine (needs util-linux "
                "unshare; 'namespaces' also needs root); use isolation='auto'"
            )
        return preferred
    for mode in ("namespaces", "userns"):
        if _probe(mode, python):
            return mode
    return "none"


def world_readable(path: str) -> bool:
    """Whether any user can read `path` (a folder): o+rx on it, o+x on every folder above it."""
    import stat

    p = os.path.realpath(path)
    try:
        if not os.stat(p).st_mode & stat.S_IROTH:
            return False
        while True:
            if not os.stat(p).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(p)
            if parent == p:
                return True
            p = parent
    except OSError:
        return False
