"""Stopping a run on a signal without losing it.

SIGINT (Ctrl-C) and SIGTERM (`kill`, `docker stop`, job schedulers) both ask the run to stop: it
finishes the step it is in, saves a checkpoint and the report, and exits with 128 + the signal
number (130, 143). A second signal aborts at once; the previous checkpoint is still complete.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """`with GracefulStop(log) as stop: ... if stop.requested: save and break`."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal aborts without saving
            raise KeyboardInterrupt
        self.signum = signum
        self.log(
            f"{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then "
            "stopping (send it again to abort without saving)"
        )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
