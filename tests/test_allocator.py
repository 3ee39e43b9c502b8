"""glibc keeps freed arrays' memory in the process once `retain_freed_memory` ran."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# Allocates and frees a 64 MB block, then reports how many free bytes glibc's heap holds:
# with the defaults such a block is mmapped and unmapped on free (nothing held), with the
# raised thresholds it comes from the heap and stays there for the next array.
PROBE = r"""
import ctypes, sys
from mlx_rft.allocator import retain_freed_memory
on = retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
p = libc.malloc(64 << 20)
ctypes.memset(p, 1, 64 << 20)
libc.free(p)
print(on, libc.mallinfo2().fordblks >= 64 << 20)
"""


def _run(env_value):
    import os

    env = dict(os.environ)
    env.pop("MLX_RFT_RETAIN_MEMORY", None)
    if env_value is not None:
        env["MLX_RFT_RETAIN_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_freed_blocks_stay_in_the_heap():
    assert _run(None) == ["True", "True"]


def test_the_env_var_keeps_glibc_defaults():
    assert _run("0") == ["False", "False"]
