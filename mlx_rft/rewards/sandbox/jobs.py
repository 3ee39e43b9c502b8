"""What one sandboxed run takes and gives: its limits, its job and its result."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import MlxRftError

ISOLATION_MODES = ("auto", "namespaces", "userns", "none")


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
