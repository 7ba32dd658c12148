"""The live reference streams in the HTTP front door: the ``--reference`` CSVs as the snapshot
(``snapshot``; without them the tables start empty, as a worker's without ``--reference``), and
``inventory``, ``payments`` and ``zip_codes`` applied on top as they arrive, by the workers' own
reader and event-time rule (consumer/reference.py).

A gateway is in no consumer group and any order may reach it, so it reads every partition of
all three streams (payments too), restores them before it is ready, and then applies what
arrives from a background thread. It never waits for a stream: an answer is given at once,
and says whether every stream had passed the order's time when it was given
(``reference_complete``; an idle partition, at its high watermark for
``TRIAGE_REFERENCE_IDLE_MS``, counts as passed). An answer given before that may miss
reference events still to come, as a worker's prediction flagged ``reference_wait_expired``
may: the published prediction carries that flag.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import structlog

from triage.bus.clients import partitions_of
from triage.bus.settings import Settings
from triage.consumer.reference import PAYMENTS, STREAMS, ReferenceFeed, ReferenceReader
from triage.consumer.validation import OrderValidator
from triage.model.reference import ReferenceTables

_POLL_S = 0.05


class LiveReference:
    """The snapshot ``tables`` kept up to date from the reference topics; :meth:`reading`
    holds the tables still while a batch is scored."""

    def __init__(self, settings: Settings, tables: ReferenceTables, *, snapshot: bool) -> None:
        self.log = structlog.get_logger("gateway.reference")
        self.feed = ReferenceFeed(tables, settings.reference,
                                  OrderValidator(settings.validation), snapshot=snapshot,
                                  log=self.log)
        self.reader = ReferenceReader(settings.connection, settings.topics, self.feed,
                                      log=self.log)
        self.reader.start()
        if settings.topics.payments_topic not in self.reader.missing:
            payments = partitions_of(self.reader.consumer, settings.topics.payments_topic)
            self.reader.assign_payments([tp.partition for tp in payments])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-reference",
                                        daemon=True)

    @property
    def tables(self) -> ReferenceTables:
        return self.feed.tables

    def start(self) -> LiveReference:
        """Read every stream up to its high watermark (before the gateway serves, as a worker
        restores before it joins), then apply what arrives from a background thread."""
        self.reader.restore(stream_names=STREAMS)
        self._thread.start()
        return self

    @contextmanager
    def reading(self) -> Iterator[None]:
        """No record is applied while the block runs (a batch is scored on still tables)."""
        with self._lock:
            yield

    def complete(self, timestamps_ms: np.ndarray) -> np.ndarray:
        """bool per order time (UTC ms): every partition of every stream has passed it. Call
        inside :meth:`reading`."""
        now = time.monotonic()
        needed = np.floor_divide(timestamps_ms, 1000) * 1000
        patient = np.full(len(needed), self.feed.idle_s)  # an idle partition has passed
        ready, _ = self.feed.admit(np.full(len(needed), -1), needed, patient, now)
        payments = self.feed.partitions(PAYMENTS)
        if payments:
            passed = min(self.feed.passed(PAYMENTS, p, now, self.feed.idle_s)
                         for p in payments)
            ready &= needed < passed
        return np.asarray(ready, dtype=bool)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    letters = self.reader.poll(timeout_s=0.0)
                if letters:  # the workers dead-letter them; a gateway only reads
                    self.log.warning("reference_records_refused", records=len(letters))
                self._stop.wait(_POLL_S)
        except Exception as exc:  # the answers go on from the tables as they stand
            self.log.error("reference_reader_failed", error=str(exc),
                           note="answers now come from the tables as they stand, flagged "
                                "reference_complete false once the streams move on")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)
        self.reader.close()

