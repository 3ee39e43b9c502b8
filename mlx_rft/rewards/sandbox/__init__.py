"""Run untrusted Python against tests in a locked-down child process.

Containment, in layers (all of them that the machine allows; `detect_isolation()` says which):

1. OS isolation, "namespaces" mode (running as root with `unshare`): the child runs in fresh
   network, PID, mount, IPC and UTS namespaces. No network interfaces exist (even 127.0.0.1 is
   unreachable); the whole file system is re-mounted read-only and a small private tmpfs on /tmp
   holds the working folder, so nothing written reaches the host; the child sees only its own
   processes, and when the sandbox's init dies the kernel kills every process in it. After the
   setup the child drops to an unprivileged uid of its own (uid_base + pool slot), so RLIMIT_NPROC
   really caps its process count (root ignores that limit) and file permissions apply. Without root,
   "userns" mode does the same inside an unprivileged user namespace (no uid drop; RLIMIT_NPROC
   counts all of the user's processes, so the cap is "current count + max_processes").
2. Resource limits on the child: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file size
   (RLIMIT_FSIZE), process count (RLIMIT_NPROC), open files, no core dumps; a wall-clock timeout
   after which the child's whole process group is SIGKILLed, then any process left with the run's
   uid or marker is swept up; stdout/stderr kept only up to `max_output_bytes`.
3. A Python-level guard (an audit hook, which user code cannot remove) that refuses network calls
   (connect, bind, DNS), process creation (fork, exec, subprocess; unless allow_subprocess),
   ctypes, and opening files for writing outside the working folder. It is the only network and
   file barrier in "none" mode (no namespaces available); it is not a security boundary against
   hostile native code, which is what layer 1 is for.


Results travel over a private pipe, each line tagged with a random nonce the tested code never
sees in its input, so printing "passed" or exiting early earns nothing. Tests still run in the
same process as the solution, so deliberately adversarial code can in principle tamper with them
(e.g. an object whose __eq__ is always True): the sandbox contains damage, it does not make
reward hacking impossible.

The parent side is `runner.CodeSandbox`; the child is the program in `child.py`, run by path.
"""

from .isolation import detect_isolation
from .jobs import ISOLATION_MODES, CodeJob, ExecResult, SandboxConfig
from .runner import CodeSandbox

__all__ = ["ISOLATION_MODES", "CodeJob", "CodeSandbox", "ExecResult", "SandboxConfig", "detect_isolation"]
