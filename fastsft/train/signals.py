"""Graceful stop on SIGTERM / SIGINT: the trainer finishes the current step, writes a checkpoint and exits cleanly.

Sits around the trainer loop (`fastsft.train.trainer`): `GracefulStop` replaces the two handlers with one that only
sets a flag, which the loop reads between optimizer steps (a host bool: no device sync). A second SIGINT (Ctrl-C
pressed twice) raises KeyboardInterrupt at once, for a person who does not want to wait for the save. Under torchrun
every rank gets the signal; the loop also ORs the flag across ranks so they all stop at the same step.
"""

from __future__ import annotations

import signal
import threading


class GracefulStop:
    """Context manager: while active, SIGTERM/SIGINT request a stop instead of killing the process."""

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict = {}
        self._sigint_count = 0

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._sigint_count += 1
            if self._sigint_count > 1:
                raise KeyboardInterrupt("second SIGINT: stopping without a checkpoint")
        self.requested = True
        self.signal_name = name

    def request(self, reason: str = "requested") -> None:
        """Ask for a stop from code (tests, early stopping)."""
        self.requested = True
        self.signal_name = reason

    def __enter__(self) -> GracefulStop:
        # Signal handlers can only be installed from the main thread (tests may run the trainer in another one).
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
