"""The live reference streams in the HTTP front door: the ``--reference`` CSVs as the snapshot
(``snapshot``; without them the tables start empty, as a worker's without ``--reference``), and
``inventory``, ``payments`` and ``zip_codes`` applied on top as they arrive, by the workers' own
reader and event-time rule (scoring/feed.py): every partition of every stream, topics
and partitions that appear later included, the same tables as a worker's, so a worker and the
gateway give the same answer for the same order.

The gateway restores the streams before it is ready, and then applies what arrives from a
background thread. It never waits for a stream: an answer is given at once, and says whether
every stream had passed the order's time when it was given (``reference_complete``; a quiet
partition counts as passed once ``TRIAGE_REFERENCE_LATENESS_MS`` has run from the order's time).
An answer given before that may miss reference events still to come, as a worker's prediction
flagged ``reference_wait_expired`` may: the published prediction carries that flag. If the
reader stops for any reason, :attr:`ReferenceThread.failed` says why and ``/readyz`` answers 503:
the answers would come from tables that no longer move.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import structlog

from triage.gateway.settings import GatewaySettings
from triage.model.reference import ReferenceTables
from triage.scoring.feed import ReferenceFeed, ReferenceReader
from triage.scoring.validation import OrderValidator

_POLL_S = 0.05


class ReferenceBusy(Exception):
    """:meth:`ReferenceThread.reading` without waiting found the tables held by the reader."""


class ReferenceThread:
    """The snapshot ``tables`` kept up to date from the reference topics; :meth:`reading`
    holds the tables still while a batch is scored."""

    def __init__(self, settings: GatewaySettings, tables: ReferenceTables, *,
                 snapshot: bool) -> None:
        self.log = structlog.get_logger("gateway.reference")
        self.feed = ReferenceFeed(tables, settings.reference,
                                  OrderValidator(settings.validation), snapshot=snapshot,
                                  log=self.log)
        self.reader = ReferenceReader(settings.connection, settings.topics, self.feed,
                                      log=self.log)
        self.reader.start()
        self.failed: str | None = None  # why the background reader stopped, if it did
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-reference",
                                        daemon=True)

    @property
    def tables(self) -> ReferenceTables:
        return self.feed.tables

    def start(self) -> ReferenceThread:
        """Read every stream up to its high watermark (before the gateway serves, as a worker
        restores before it joins), then apply what arrives from a background thread."""
        self.reader.restore()
        self._thread.start()
        return self

    @contextmanager
    def reading(self, wait: bool = True) -> Iterator[None]:
        """No record is applied while the block runs (a batch is scored on still tables).
        ``wait=False``: raise :class:`ReferenceBusy` at once if the reader holds the tables (it
        holds them while it polls: seconds when the broker does not answer), for a caller on
        the event loop, which must not wait."""
        if not self._lock.acquire(blocking=wait):
            raise ReferenceBusy("the reference reader holds the tables")
        try:
            yield
        finally:
            self._lock.release()

    def complete(self, timestamps_ms: np.ndarray) -> np.ndarray:
        """bool per order time (UTC ms): every partition of every stream has passed it. Call
        inside :meth:`reading`."""
        times = np.asarray(timestamps_ms, dtype=np.int64)
        ready, _ = self.feed.admit(times, times, np.zeros(len(times)))
        return np.asarray(ready, dtype=bool)

    @property
    def healthy(self) -> bool:
        """The background reader is running (or not started yet)."""
        return self.failed is None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    letters = self.reader.poll(timeout_s=0.0).letters
                if letters:  # the workers dead-letter them; a gateway only reads
                    self.log.warning("reference_records_refused", records=len(letters))
                self._stop.wait(_POLL_S)
        except Exception as exc:  # anything: the thread ends, and readiness says so
            self.failed = f"{type(exc).__name__}: {exc}"
            self.log.error("reference_reader_failed", error=self.failed,
                           note="/readyz answers 503 from now on: the tables no longer move")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)
        self.reader.close()

