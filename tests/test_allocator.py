"""glibc keeps freed arrays' memory in the process inside `allocator.retained()`, and not after it."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# Allocates and frees a 64 MB block and reports whether glibc's heap still holds it: with the
# defaults such a block is mmapped and unmapped on free (nothing held), with the raised thresholds
# it comes from the heap and stays there for the next array. Checked inside a block, inside a
# nested block after the inner one exited, and after the outermost one exited (which also hands
# the freed memory back to the kernel).
PROBE = r"""
import ctypes
from mlx_rft.cpu.allocator import in_force, retained
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def kept():
    p = libc.malloc(64 << 20)
    ctypes.memset(p, 1, 64 << 20)
    libc.free(p)
    return libc.mallinfo2().fordblks >= 64 << 20
out = []
with retained() as on:
    out += [on, kept()]
    with retained():
        pass
    out += [in_force(), kept()]
out += [in_force(), libc.mallinfo2().fordblks >= 64 << 20, kept()]
print(*out)
"""


def _run(env_value):
    import os

    env = dict(os.environ)
    env.pop("MLX_RFT_RETAIN_MEMORY", None)
    if env_value is not None:
        env["MLX_RFT_RETAIN_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_freed_blocks_stay_in_the_heap_inside_the_block_only():
    assert _run(None) == ["True", "True", "True", "True", "False", "False", "False"]


def test_the_env_var_keeps_glibc_defaults():
    assert _run("0") == ["False", "False", "False", "False", "False", "False", "False"]
