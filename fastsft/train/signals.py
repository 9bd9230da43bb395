"""Graceful stop on SIGTERM / SIGINT: the trainer finishes the current step, writes a checkpoint and exits cleanly.

Sits around the whole of `Trainer.fit` (`fastsft.train.trainer`), the final evaluation and the final save included:
`GracefulStop` replaces the two handlers with one that only sets a flag, which the loop reads between optimizer steps
(a host bool: no device sync) and which makes the end of the run skip its final evaluation. A second SIGINT (Ctrl-C
pressed twice) raises KeyboardInterrupt at once, for a person who does not want to wait, except inside `protected()`
(a checkpoint being written): a save is never cut short, since a half-written checkpoint is worth nothing. Under
torchrun every rank gets the signal; the loop also ORs the flag across ranks so they all stop at the same step.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class GracefulStop:
    """Context manager: while active, SIGTERM/SIGINT request a stop instead of killing the process."""

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict = {}
        self._sigint_count = 0
        self._protected = 0

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._sigint_count += 1
            if self._sigint_count > 1 and not self._protected:
                raise KeyboardInterrupt("second SIGINT: stopping without a checkpoint")
        self.requested = True
        self.signal_name = self.signal_name or name

    @contextlib.contextmanager
    def protected(self):
        """A section no signal interrupts (a checkpoint save): signals only set the flag inside it."""
        self._protected += 1
        try:
            yield
        finally:
            self._protected -= 1

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
