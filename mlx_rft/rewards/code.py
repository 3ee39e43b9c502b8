"""A sandboxed code reward: run a completion's Python against a row's tests in a locked-down child.

Score = fraction of tests passed. Tests come from the `tests` column: a list of snippets (each an
assert or a few lines; each is one test), a string of top-level `assert` statements (each is one
test; the other statements are setup), or HumanEval-style `def check(candidate)` code plus an
`entry_point` column (one test: `check(<entry_point>)`).

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
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import queue
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..errors import MlxRftError

ISOLATION_MODES = ("auto", "namespaces", "userns", "none")

_NETWORK_EVENTS = (
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
)
_PROCESS_EVENTS = (
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "pty.spawn",
)
_NATIVE_EVENTS = ("ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function")

# Stdlib modules loaded before dropping privileges when the interpreter's own folder is unreadable to
# the sandbox uid and no mount namespace can expose it (root without unshare).
_PRELOAD = (
    "abc array ast base64 binascii bisect calendar cmath collections collections.abc contextlib copy "
    "csv dataclasses datetime decimal encodings.idna enum fractions functools hashlib heapq io itertools json math "
    "numbers operator pprint queue random re socket statistics string struct textwrap time typing "
    "unicodedata"
)


@dataclass
class SandboxConfig:
    """Limits and isolation for one sandboxed run (each of `concurrency` runs gets its own)."""

    timeout: float = 10.0  # wall-clock seconds for the whole run (solution + all tests)
    cpu_seconds: int | None = None  # RLIMIT_CPU; default ceil(timeout) + 1
    memory_mb: int = 1024  # RLIMIT_AS per process
    max_processes: int = 8  # RLIMIT_NPROC (processes and threads of the sandbox uid)
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file the code may write (stdout included)
    tmpfs_mb: int = 64  # size of the private /tmp in namespaces mode (all files written)
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 16_384  # stdout/stderr kept per run
    test_timeout: float | None = None  # per-test limit (SIGALRM in the child); None: only `timeout`
    concurrency: int = 0  # runs in parallel; 0 = min(4, CPU count)
    isolation: str = "auto"  # auto | namespaces | userns | none (see the module docstring)
    python_guard: bool = True  # the audit-hook layer
    allow_subprocess: bool = False  # let the code fork/exec (the guard blocks it by default)
    site_packages: bool = False  # let the code import third-party packages of this interpreter
    uid_base: int = 1_650_000_000  # sandbox uids are uid_base + slot (root only); must be unused
    python: str | None = None  # interpreter for the child; default sys.executable

    def __post_init__(self):
        if self.isolation not in ISOLATION_MODES:
            raise MlxRftError(f"sandbox isolation must be one of {ISOLATION_MODES}, got {self.isolation!r}")
        if self.timeout <= 0 or self.memory_mb <= 0 or self.max_processes < 1:
            raise MlxRftError("sandbox timeout, memory_mb and max_processes must be positive")


@dataclass
class CodeJob:
    """One program to run: solution code, test-side setup, and the tests (one snippet each)."""

    code: str
    tests: list[str]
    setup: str = ""


@dataclass
class ExecResult:
    """Outcome of one sandboxed run.

    passed/total: tests passed / tests run; results[i], errors[i]: per test (error text or None).
    status: "ok" (all tests ran), "timeout" (wall clock), "crashed" (the child died early: exit,
        signal, resource limit), "sandbox_error" (the sandbox itself failed before running code).
    """

    passed: int
    total: int
    results: list[bool]
    errors: list[str | None]
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: str
    stray_processes: int = 0  # processes left after the kill that the sweep had to kill
    notes: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return self.passed / self.total if self.total else 0.0


# ---------------------------------------------------------------------------------------------
# The child: a bootstrap passed with `python -I -c`, reading its job as JSON on stdin.

_BOOT = r'''
import os, sys

def _boot():
    import json, re, resource, signal, builtins
    rfd = int(sys.argv[1])
    job = json.loads(sys.stdin.buffer.read())
    nonce = job.pop("nonce")
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    dumps, write = json.dumps, os.write

    def send(obj):
        obj["n"] = nonce
        write(rfd, (dumps(obj) + "\n").encode())

    notes = []
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except Exception as e:
        libc = None
        notes.append("no ctypes: %s" % e)
    uid, gid = job["uid"], job["gid"]
    if job["lockdown"]:
        MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
        OPT = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
               "nodiratime": 2048, "relatime": 1 << 21}
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]

        def mount(src, dst, fstype, flags, data=None):
            enc = lambda s: None if s is None else os.fsencode(s)
            if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
                raise OSError(ctypes.get_errno(), "mount %s: %s" % (dst, os.strerror(ctypes.get_errno())))

        unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
        # Every mount read-only (this mount namespace is private, the host is untouched)...
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
        for parts in mounts:
            point = unescape(parts[4])
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY
            for opt in parts[5].split(","):
                flags |= OPT.get(opt, 0)
            try:
                mount(None, point, None, flags)
            except OSError as e:
                if point == "/":
                    raise  # never run with a writable root: fail as a sandbox error instead
                notes.append(str(e))
        # ...then a private, size-capped /tmp that holds the working folder.
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=%dk,mode=755" % job["tmpfs_kb"])
        workdir = "/tmp/work"
        os.mkdir(workdir, 0o700)
        # The interpreter's folders may sit under an unreadable home (e.g. /root/.pyenv): expose
        # them read-only under /tmp so the unprivileged uid can still import the stdlib.
        if uid is not None:
            os.mkdir("/tmp/.python", 0o755)
            remap = {}
            for i, path in enumerate(list(sys.path)):
                if os.path.isdir(path):
                    target = "/tmp/.python/%d" % i
                    os.mkdir(target, 0o755)
                    mount(path, target, None, MS_BIND)
                    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
                    sys.path[i] = target
                    remap[path] = target
            # Packages imported already (collections, encodings) find submodules via __path__.
            for mod in list(sys.modules.values()):
                paths = getattr(mod, "__path__", None)
                if isinstance(paths, list):
                    for j, p in enumerate(paths):
                        for old, new in remap.items():
                            if p == old or p.startswith(old + "/"):
                                paths[j] = new + p[len(old):]
            sys.path_importer_cache.clear()
    else:
        workdir = job["workdir"]
    if uid is not None:
        os.chown(workdir, uid, gid)
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir
    if uid is not None and not job["lockdown"]:
        import importlib
        for name in job["preload"]:
            try:
                importlib.import_module(name)
            except Exception:
                pass
    R = resource
    lim = job["limits"]
    for name, soft, hard in (("CORE", 0, 0), ("CPU", lim["cpu"], lim["cpu"] + 1),
                             ("FSIZE", lim["fsize"], lim["fsize"]), ("NOFILE", lim["nofile"], lim["nofile"]),
                             ("NPROC", lim["nproc"], lim["nproc"]), ("AS", lim["as"], lim["as"])):
        try:
            R.setrlimit(getattr(R, "RLIMIT_" + name), (soft, hard))
        except (ValueError, OSError, AttributeError) as e:  # e.g. RLIMIT_AS on macOS
            notes.append("RLIMIT_%s not set: %s" % (name, e))
    if uid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    try:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS (Linux): no privilege gain through exec
    except AttributeError:
        pass
    if job["guard"]:
        blocked = frozenset(job["blocked"])
        wd = os.path.realpath(workdir)
        realpath, fspath, fsdecode = os.path.realpath, os.fspath, os.fsdecode
        WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        PATH_EVENTS = frozenset(("os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod",
                                 "os.chown", "os.link", "os.symlink", "os.truncate", "os.utime",
                                 "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.copyfile",
                                 "shutil.copytree", "shutil.move", "shutil.chown"))

        def inside(p):
            if isinstance(p, int) or p is None:
                return True
            try:
                rp = realpath(fsdecode(fspath(p)))
            except Exception:
                return False
            return rp == wd or rp.startswith(wd + "/") or rp == "/dev/null"

        def guard(event, args):
            if event in blocked:
                raise PermissionError("sandbox: %s is not allowed" % event)
            if event == "open":
                path, mode, flags = args
                if ((mode and any(c in mode for c in "wax+")) or (flags and flags & WRITE)) and not inside(path):
                    raise PermissionError("sandbox: writing outside the working folder is not allowed")
            elif event in PATH_EVENTS:
                for p in args[:2]:
                    if isinstance(p, (str, bytes, os.PathLike)) and not inside(p):
                        raise PermissionError("sandbox: %s outside the working folder is not allowed" % event)

        sys.addaudithook(guard)
    send({"ready": True, "notes": notes})

    g = {"__name__": "__solution__", "__builtins__": builtins}
    limit = job["test_timeout"]

    def on_alarm(signum, frame):
        raise TimeoutError("test timed out after %gs" % limit)

    if limit:
        signal.signal(signal.SIGALRM, on_alarm)

    def describe(e):
        try:
            return ("%s: %s" % (type(e).__name__, e))[:300]
        except BaseException:
            return type(e).__name__

    def phase(src, filename):
        try:
            if limit:
                signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                exec(compile(src, filename, "exec"), g)
            finally:
                if limit:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            return None
        except BaseException as e:
            return describe(e)

    failed = phase(job["code"], "<solution>")
    if failed:
        failed = "solution: " + failed
    elif job["setup"]:
        failed = phase(job["setup"], "<tests>")
        failed = failed and "test setup: " + failed
    for i, test in enumerate(job["tests"]):
        err = failed or phase(test, "<test %d>" % i)
        send({"i": i, "ok": err is None, "e": err})
    send({"done": True})
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(0)

_boot()
'''


# ---------------------------------------------------------------------------------------------
# Isolation probing


_NS_FLAGS = ["--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]


def _prefix(mode: str) -> list[str]:
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
            [*_prefix(mode), python, "-I", "-S", "-c", check],
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


# ---------------------------------------------------------------------------------------------
# Jobs from completions and test columns

_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The Python code in a completion: the last ```python block that defines something (def or
    class), else the last python block, else the last fenced block, else the whole text. An
    unclosed fence (a cut-off completion) runs to the end of the text."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(text)]
    if not blocks:
        return text
    python = [b for lang, b in blocks if lang in ("python", "py", "python3")]
    defining = [b for b in python if re.search(r"^\s*(def|class|async def)\s", b, re.MULTILINE)]
    for choice in (defining, python, [b for _, b in blocks]):
        if choice:
            return choice[-1]
    return text


def build_job(code: str, tests: Any, entry_point: str | None = None, prefix: str | None = None) -> CodeJob:
    """A CodeJob from solution code and a row's tests (see the module docstring for the forms)."""
    if prefix:
        code = f"{prefix}\n{code}"
    if isinstance(tests, (list, tuple)):
        if not all(isinstance(t, str) for t in tests):
            raise ValueError("a tests list must hold strings of Python code")
        return CodeJob(code=code, tests=list(tests))
    if not isinstance(tests, str):
        raise ValueError(f"tests must be a string or a list of strings, got {type(tests).__name__}")
    if entry_point:
        if not str(entry_point).isidentifier():
            raise ValueError(f"entry_point {entry_point!r} is not a Python name")
        return CodeJob(code=code, setup=tests, tests=[f"check({entry_point})"])
    try:
        tree = ast.parse(tests)
    except SyntaxError as e:
        raise ValueError(f"the tests do not parse as Python: {e}") from None
    asserts = [s for s in tree.body if isinstance(s, ast.Assert)]
    if not asserts:
        if any(isinstance(s, ast.FunctionDef) and s.name == "check" for s in tree.body):
            raise ValueError("the tests define check(candidate) but the row has no entry_point")
        return CodeJob(code=code, tests=[tests])
    setup = [ast.get_source_segment(tests, s) for s in tree.body if not isinstance(s, ast.Assert)]
    return CodeJob(
        code=code,
        setup="\n".join(s for s in setup if s),
        tests=[ast.get_source_segment(tests, s) or ast.unparse(s) for s in asserts],
    )


# ---------------------------------------------------------------------------------------------
# The parent side


class CodeSandbox:
    """Runs CodeJobs in sandboxed children, `concurrency` at a time (see the module docstring)."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self.python = self.config.python or sys.executable
        if not (os.path.isfile(self.python) and os.access(self.python, os.X_OK)):
            raise MlxRftError(
                f"sandbox interpreter {self.python!r} is not an executable file; set SandboxConfig.python "
                "to a Python 3 interpreter (default: this one)"
            )
        self.isolation = detect_isolation(self.config.isolation, self.python)
        self.is_root = os.geteuid() == 0
        self.concurrency = self.config.concurrency or min(4, os.cpu_count() or 1)
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.concurrency):
            self._slots.put(slot)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # Can an unprivileged uid import the child interpreter's stdlib? (Not under /root/.pyenv.)
        self._stdlib_hidden = self.python != sys.executable or not _world_readable(
            sysconfig.get_paths()["stdlib"]
        )

    def __repr__(self) -> str:
        return f"CodeSandbox(isolation={self.isolation!r}, concurrency={self.concurrency})"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def run(self, job: CodeJob) -> ExecResult:
        """Run one job (blocking); uses a free slot of the pool's uids."""
        slot = self._slots.get()
        try:
            return self._run(job, slot)
        finally:
            self._slots.put(slot)

    def run_many(self, jobs: Sequence[CodeJob]) -> list[ExecResult]:
        """Run jobs `concurrency` at a time; results in input order."""
        if not jobs:
            return []
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="mlx-rft-sandbox")
        return list(self._pool.map(self.run, jobs))

    async def arun_many(self, jobs: Sequence[CodeJob]) -> list[ExecResult]:
        return await asyncio.to_thread(self.run_many, jobs)

    # -- one run -----------------------------------------------------------------------------

    def _limits(self, uid: int | None) -> dict[str, int]:
        c = self.config
        nproc = c.max_processes
        if uid is None:
            # Without a uid of its own, RLIMIT_NPROC counts all of this user's processes.
            nproc += _count_processes(os.getuid())
        return {
            "cpu": int(c.cpu_seconds or int(c.timeout + 0.999) + 1),
            "as": c.memory_mb << 20,
            "fsize": c.file_size_mb << 20,
            "nofile": c.max_open_files,
            "nproc": nproc,
        }

    def _run(self, job: CodeJob, slot: int) -> ExecResult:
        c = self.config
        lockdown = self.isolation in ("namespaces", "userns")
        # Root drops to a uid of its own; in a user namespace only the caller's uid is mapped.
        uid = c.uid_base + slot if self.is_root and self.isolation != "userns" else None
        marker = secrets.token_hex(16)
        nonce = secrets.token_hex(16)
        blocked = list(_NETWORK_EVENTS) + list(_NATIVE_EVENTS)
        if not c.allow_subprocess:
            blocked += _PROCESS_EVENTS
        hostdir = tempfile.mkdtemp(prefix="mlx-rft-sandbox-")
        workdir = os.path.join(hostdir, "work")
        try:
            if not lockdown:
                os.mkdir(workdir, 0o700)
                if uid is not None:
                    os.chmod(hostdir, 0o711)  # the sandbox uid must traverse into work/
            payload = {
                "nonce": nonce,
                "uid": uid,
                "gid": uid,
                "lockdown": lockdown,
                "tmpfs_kb": c.tmpfs_mb << 10,
                "workdir": workdir,
                "preload": _PRELOAD.split() if uid is not None and not lockdown and self._stdlib_hidden else [],
                "limits": self._limits(uid),
                "guard": c.python_guard,
                "blocked": blocked,
                "test_timeout": c.test_timeout,
                "code": job.code,
                "setup": job.setup,
                "tests": job.tests,
            }
            flags = ["-I"] if c.site_packages else ["-I", "-S"]
            env = {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1",
                "MLX_RFT_SANDBOX": marker,
            }
            r, w = os.pipe()
            out_path, err_path = os.path.join(hostdir, "stdout"), os.path.join(hostdir, "stderr")
            t0 = time.monotonic()
            with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
                try:
                    proc = subprocess.Popen(
                        [*_prefix(self.isolation), self.python, *flags, "-c", _BOOT, str(w)],
                        stdin=subprocess.PIPE, stdout=fo, stderr=fe, pass_fds=(w,), env=env,
                        cwd=hostdir, start_new_session=True,
                    )
                except OSError as e:
                    os.close(r)
                    return ExecResult(
                        passed=0, total=len(job.tests), results=[False] * len(job.tests),
                        errors=["not run"] * len(job.tests), status="sandbox_error", returncode=None,
                        stdout="", stderr=f"cannot start the sandbox: {e}", seconds=0.0,
                        isolation=self.isolation,
                    )
                finally:
                    os.close(w)
            try:
                raw, timed_out = self._collect(proc, r, payload, t0)
            finally:
                # The child and everything it started: the group, then anything that left it.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
                raw += _drain(r)
                os.close(r)
                strays = _sweep(marker, uid)
            seconds = time.monotonic() - t0
            return self._result(job, raw, nonce, timed_out, proc.returncode, out_path, err_path, seconds, strays)
        finally:
            shutil.rmtree(hostdir, ignore_errors=True)

    def _collect(self, proc: subprocess.Popen, r: int, payload: dict, t0: float) -> tuple[bytes, bool]:
        """Send the job, then read results until the child exits, closes the pipe, or time runs out."""
        try:
            proc.stdin.write(json.dumps(payload).encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        os.set_blocking(r, False)
        sel = selectors.DefaultSelector()
        sel.register(r, selectors.EVENT_READ, "pipe")
        pidfd = None
        try:
            pidfd = os.pidfd_open(proc.pid)
            sel.register(pidfd, selectors.EVENT_READ, "exit")
        except (AttributeError, OSError):
            pass  # no pidfd: poll the child below instead
        cap = 1 << 20
        buf = bytearray()
        deadline = t0 + self.config.timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return bytes(buf), True
                events = sel.select(remaining if pidfd is not None else min(remaining, 0.02))
                eof = exited = False
                for key, _ in events:
                    if key.data == "pipe":
                        chunk = _read_some(r)
                        if chunk is None:
                            continue
                        if not chunk:
                            eof = True
                        elif len(buf) < cap:
                            buf += chunk
                    else:
                        exited = True
                if pidfd is None and proc.poll() is not None:
                    exited = True
                if eof or exited:
                    return bytes(buf), False
        finally:
            sel.close()
            if pidfd is not None:
                os.close(pidfd)

    def _result(self, job, raw, nonce, timed_out, returncode, out_path, err_path, seconds, strays) -> ExecResult:
        total = len(job.tests)
        results = [False] * total
        errors: list[str | None] = ["not run"] * total
        ready = done = False
        notes: list[str] = []
        for line in raw.decode("utf-8", "replace").splitlines():
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(msg, dict) or msg.get("n") != nonce:
                continue  # not from the harness
            if msg.get("ready"):
                ready = True
                notes = [str(x) for x in msg.get("notes", [])]
            elif msg.get("done"):
                done = True
            elif isinstance(msg.get("i"), int) and 0 <= msg["i"] < total and errors[msg["i"]] == "not run":
                results[msg["i"]] = bool(msg.get("ok"))
                errors[msg["i"]] = None if msg.get("ok") else str(msg.get("e"))
        if done:
            status = "ok"
        elif timed_out:
            status = "timeout"
        elif ready:
            status = "crashed"
        else:
            status = "sandbox_error"
        if status == "timeout":
            errors = [e if e != "not run" else "timeout" for e in errors]
        return ExecResult(
            passed=sum(results),
            total=total,
            results=results,
            errors=errors,
            status=status,
            returncode=returncode,
            stdout=_head(out_path, self.config.max_output_bytes),
            stderr=_head(err_path, self.config.max_output_bytes),
            seconds=seconds,
            isolation=self.isolation,
            stray_processes=strays,
            notes=notes,
        )


def _world_readable(path: str) -> bool:
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


def _read_some(fd: int) -> bytes | None:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


def _drain(fd: int) -> bytes:
    """What is left in a non-blocking pipe (the writers are dead by now)."""
    out = bytearray()
    while len(out) < (1 << 20):
        chunk = _read_some(fd)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _head(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return ""
    text = data[:limit].decode("utf-8", "replace")
    return text + "\n[... output truncated]" if len(data) > limit else text


def _proc_state(pid: int) -> tuple[int | None, str, bool]:
    """(uid, state letter, SIGKILL pending) of a process from /proc; uid None when it is gone."""
    uid, state, dying = None, "", False
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "Uid":
                    uid = int(value.split()[0])
                elif key == "State":
                    state = value.split()[0]
                elif key in ("SigPnd", "ShdPnd"):
                    dying |= bool(int(value, 16) & (1 << (signal.SIGKILL - 1)))
    except (OSError, ValueError, IndexError):
        return None, "", False
    return uid, state, dying


def _processes() -> list[tuple[int, int | None, str, bool]]:
    """(pid, uid, state, dying) of every process: /proc on Linux, `ps` elsewhere (macOS)."""
    if os.path.isdir("/proc/self"):
        return [(int(p), *_proc_state(int(p))) for p in os.listdir("/proc") if p.isdigit()]
    try:
        out = subprocess.run(["ps", "-A", "-o", "pid=,uid=,stat="], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
            rows.append((int(parts[0]), int(parts[1]), parts[2][:1], False))
    return rows


def _count_processes(uid: int) -> int:
    return sum(1 for _, owner, _, _ in _processes() if owner == uid)


def _sweep(marker: str, uid: int | None, wait: float = 5.0) -> int:
    """SIGKILL every live process that carries this run's uid or environment marker; their number.

    In namespaces mode the kernel already kills the sandbox's PID namespace with its init; the
    sweep is what catches escapees (setsid, double fork) in the other modes. Processes already
    dying from the group kill (SIGKILL pending, or zombies) are waited for, not counted. The
    marker is read from /proc/PID/environ, so without /proc only the uid identifies strays.
    """
    needle = f"MLX_RFT_SANDBOX={marker}".encode()
    killed: set[int] = set()
    deadline = time.monotonic() + wait
    while True:
        pending = False
        for pid, owner, state, dying in _processes():
            if owner is None or state in ("Z", "X"):
                continue
            match = uid is not None and owner == uid
            if not match:
                try:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        match = needle in f.read()
                except OSError:
                    continue
            if not match:
                continue
            pending = True
            if dying:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        if not pending or time.monotonic() > deadline:
            return len(killed)
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------------
# The reward


def make_code_reward(
    config: SandboxConfig | None = None,
    *,
    tests_column: str = "tests",
    entry_point_column: str = "entry_point",
    prefix_column: str | None = None,
    name: str = "code",
    **config_overrides,
):
    """An async reward: the fraction of a row's tests that the completion's code passes.

    tests_column: the row's tests (see the module docstring); rows where it is None score None.
    entry_point_column: HumanEval's function name for `check(candidate)`, when present.
    prefix_column: a column prepended to the code (e.g. a HumanEval prompt with the signature).
    config_overrides: SandboxConfig fields, e.g. make_code_reward(timeout=5, memory_mb=512).
    The sandbox is created on first use (it probes the OS for namespace support then).
    """
    if config is not None and config_overrides:
        raise MlxRftError("pass either a SandboxConfig or config fields to make_code_reward, not both")
    try:
        cfg = config or SandboxConfig(**config_overrides)
    except TypeError as e:
        raise MlxRftError(f"make_code_reward: {e}; see SandboxConfig for the fields") from None
    state: dict[str, CodeSandbox] = {}
    lock = threading.Lock()

    def sandbox() -> CodeSandbox:
        with lock:
            if "box" not in state:
                state["box"] = CodeSandbox(cfg)
            return state["box"]

    async def code_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        if tests_column not in columns:
            raise MlxRftError(
                f"reward {name!r} needs the dataset column {tests_column!r} (test code per row); "
                f"the batch has: {', '.join(sorted(columns)) or 'none'}"
            )
        tests = columns[tests_column]
        entry = columns.get(entry_point_column) or [None] * len(completions)
        prefix = columns.get(prefix_column) if prefix_column else None
        jobs, rows = [], []
        for i, completion in enumerate(completions):
            if tests[i] is None:
                continue
            try:
                job = build_job(extract_code(completion), tests[i], entry[i], prefix[i] if prefix else None)
            except ValueError as e:
                raise MlxRftError(f"reward {name!r}: row {i} has unusable tests: {e}; fix the dataset") from None
            jobs.append(job)
            rows.append(i)
        box = sandbox()
        results = await box.arun_many(jobs)
        scores: list[float | None] = [None] * len(completions)
        for i, res in zip(rows, results):
            if res.status == "sandbox_error":
                raise MlxRftError(
                    f"reward {name!r}: the code sandbox failed to start ({res.isolation} isolation): "
                    f"{res.stderr.strip()[-500:] or 'no output'}; try isolation='none' or check unshare"
                )
            scores[i] = res.score
        code_reward.last_results = results  # for inspection and tests
        return scores

    code_reward.__name__ = code_reward.__qualname__ = name
    code_reward.sandbox = sandbox
    code_reward.last_results = []
    return code_reward


code = make_code_reward()
