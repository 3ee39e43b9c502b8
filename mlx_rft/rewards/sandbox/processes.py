"""The processes of a run: counting them, and sweeping up any left after the group kill."""

from __future__ import annotations

import os
import signal
import subprocess
import time


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


def count_processes(uid: int) -> int:
    return sum(1 for _, owner, _, _ in _processes() if owner == uid)


def sweep(marker: str, uid: int | None, wait: float = 5.0) -> int:
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
