"""Ctrl-C in a long command: stop at the next step, finish cleanly, say how far it got.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives; inside a
confluent-kafka call it surfaced as ``SystemError: <method 'poll' of 'cimpl.Producer' objects>
returned NULL without setting an exception`` (3 of 10 Ctrl-Cs during ``triage replay``), and in
the other 7 the command exited 130 without saying what it had sent. :class:`Interrupt` turns
SIGINT and SIGTERM into a flag the command's loop checks between two steps; the command then
flushes what it handed to the producer, prints its summary (with where to resume) and exits
130 (:data:`EXIT_INTERRUPTED`, 128 + SIGINT, as shells report a Ctrl-C). A second signal stops
at once: the previous handlers come back and it is raised again. Where a command waits outside
librdkafka (for a line on stdin), it sets :attr:`Interrupt.raising`, and the first signal also
raises KeyboardInterrupt there.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

EXIT_INTERRUPTED = 128 + signal.SIGINT


class Interrupt:
    """A context manager: while inside it (main thread only), SIGINT and SIGTERM set
    :attr:`requested` (and the :attr:`event`) instead of raising. ``signal_name``: the first
    signal's name (``SIGINT``), None before one. ``raising``: while True, a signal also raises
    KeyboardInterrupt where the main thread is (set it only around waits outside a C call).
    Outside the main thread it does nothing (signals reach only the main thread)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name: str | None = None
        self.raising = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():  # the second one: stop now
            self._restore()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        self.event.set()
        if self.raising:
            raise KeyboardInterrupt

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous = signal.signal(signum, self._handle)
                # None: a handler not installed from Python; the default is the closest.
                self._previous[signum] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._restore()
