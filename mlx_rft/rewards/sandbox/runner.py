"""The parent side: `CodeSandbox` starts each job's child, feeds it, collects and cleans up."""

from __future__ import annotations

import asyncio
import json
import os
import queue
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
from pathlib import Path

from ...errors import MlxRftError
from .isolation import detect_isolation, isolation_prefix, world_readable
from .jobs import CodeJob, ExecResult, SandboxConfig
from .processes import count_processes, sweep

# The child program, run by path (see child.py).
CHILD = str(Path(__file__).with_name("child.py"))

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


class CodeSandbox:
    """Runs CodeJobs in sandboxed children, `concurrency` at a time (see the package docstring)."""

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
        self._stdlib_hidden = self.python != sys.executable or not world_readable(
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
            nproc += count_processes(os.getuid())
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
                        [*isolation_prefix(self.isolation), self.python, *flags, CHILD, str(w)],
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
                strays = sweep(marker, uid)
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
