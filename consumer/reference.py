"""Live reference data: the streams ``inventory``, ``payments`` and ``zip_codes`` applied to a
worker's as-of tables, and the event-time rule that says when an order may be scored.

**What a worker reads.** Every partition of ``inventory`` and ``zip_codes`` (global tables),
and, for each orders partition it owns, the same partition of ``payments`` (co-partitioned:
same count, the Java client's partitioner), read with ``assign()`` from the beginning, never
through a consumer group and never committed. A payments partition is restored when its orders
partition is assigned and dropped when it is revoked. Records are applied between batches; the
lookups stay vectorised over a batch (model/reference.py).

**Event time decides, not arrival.** A reference event applies from the first whole second at
or after its time (``event_seconds``), so an order at second ``s`` needs exactly the events up
to ``s * 1000`` ms. A partition of a reference stream has *passed* time ``T`` when it delivered
an event later than ``T``, or when it has sat at its high watermark (taken from its fetches)
for ``TRIAGE_REFERENCE_IDLE_MS``, its stream has had records, and the order has itself waited
that long (so that an event published just before the order, still in flight when the order was
fetched, is not missed). With a CSV snapshot loaded, a stream that has had no record holds no
news: it has passed everything. Without one, it has passed nothing. An order is scored once
every partition it reads has passed ``s * 1000`` (inventory and zip codes: all of theirs;
payments: its own), or when ``TRIAGE_REFERENCE_MAX_WAIT_MS`` has passed since it was consumed
and no partition that holds it back has records left to read: then its prediction says
``reference_wait_expired`` and the metric ``triage_reference_wait_expired_total`` counts it.
The max wait is for a stream whose producer is late or has stopped; a reader that is merely
behind (a replay at full speed, a restart, a worker short of CPU) has the order's events
coming, so the order waits for them, as Kafka Streams waits on a partition with known lag
(KIP-695), and ``TRIAGE_MAX_WAITING_ORDERS`` pauses its orders partition meanwhile. "Records
left" is what the fetches' high watermarks say; a partition whose watermark is unknown holds
nothing back. With each partition in event-time order the
features then equal ``pandas.merge_asof`` over the complete reference history. An event that
arrives after orders it applies to were scored is *late*: counted
(``triage_reference_late_events_total``) and logged; published predictions are never rewritten.

**Bad reference records** (that do not decode or validate) go to the reference dead-letter
topic with their reason and do not move their stream's progress. After a restart the streams
are read again from the beginning, so a bad record is dead-lettered again.

:class:`ReferenceFeed` is that logic without Kafka; :class:`ReferenceReader` reads the topics
into it.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from triage.bus.clients import Source, make_consumer, partitions_of, records_of, source_of
from triage.bus.errors import BadRecord, ConfigurationError
from triage.bus.settings import ConnectionSettings, ReferenceSettings, TopicSettings
from triage.consumer import metrics
from triage.consumer.validation import OrderValidator
from triage.model.reference import ReferenceTables, event_seconds
from triage.schemas.codec import Codec, codec_for

INVENTORY, PAYMENTS, ZIP_CODES = "inventory", "payments", "zip_codes"
STREAMS = (INVENTORY, PAYMENTS, ZIP_CODES)
_NEVER = -(2**62)      # "passed nothing"
_ALWAYS = 2**62        # "passed every time"
_RETAIN_EVERY = 100_000  # apply retention after this many records (it is O(table))
_FIELDS = {INVENTORY: ("sku_code", "timestamp_ms"), PAYMENTS: ("order_id", "timestamp_ms"),
           ZIP_CODES: ("zip_code", "available_from_ms")}  # key and event time of each stream


@dataclass
class PartitionProgress:
    """How far one reference partition has been read."""

    max_event_ms: int = _NEVER       # latest event time applied (UTC ms)
    next_offset: int = 0             # the next offset to read
    low: int = 0                     # low and high watermarks from the latest fetch; -1: none
    high: int = -1
    at_end_since: float | None = None  # monotonic seconds since it has been at its high mark

    @property
    def at_end(self) -> bool:
        return self.high >= 0 and max(self.next_offset, self.low) >= self.high


@dataclass(frozen=True)
class Applied:
    """What applying a batch of reference records did."""

    applied: int = 0
    late: int = 0
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (index, reason, msg)


class ReferenceFeed:
    """The worker's reference tables and how far each stream has been read (module docstring).

    ``snapshot``: a CSV snapshot was loaded first. Times: ``now`` is ``time.monotonic()``
    seconds; event times are UTC ms.
    """

    def __init__(self, tables: ReferenceTables, settings: ReferenceSettings,
                 validator: OrderValidator, *, snapshot: bool, log: Any = None) -> None:
        self.tables = tables
        self.idle_s = settings.reference_idle_ms / 1000.0
        self.max_wait_s = settings.reference_max_wait_ms / 1000.0
        self.retention_s = settings.retention_s
        self.validator = validator
        self.snapshot = snapshot
        self.log = log or structlog.get_logger("reference")
        self.progress: dict[tuple[str, int], PartitionProgress] = {}
        self.had_records = dict.fromkeys(STREAMS, False)
        # Latest order second (as ms) scored that read each stream (payments: per partition):
        # an event at or before it is late.
        self.scored_upto = dict.fromkeys((INVENTORY, ZIP_CODES), _NEVER)
        self.payments_scored_upto: dict[int, int] = {}
        self._since_retention = 0

    # -- partitions ------------------------------------------------------------------------

    def assign(self, stream: str, partitions: Iterable[int]) -> None:
        """Start tracking partitions of ``stream``, read from the beginning."""
        for partition in partitions:
            self.progress[(stream, partition)] = PartitionProgress()
            if stream == PAYMENTS:
                self.tables.payments.partition(partition)

    def revoke_payments(self, partitions: Iterable[int]) -> None:
        """Forget payments partitions (their orders partitions were revoked): their tables
        too."""
        for partition in partitions:
            self.progress.pop((PAYMENTS, partition), None)
            self.tables.payments.drop(partition)
            self.payments_scored_upto.pop(partition, None)

    def partitions(self, stream: str) -> list[int]:
        return sorted(p for s, p in self.progress if s == stream)

    # -- records -----------------------------------------------------------------------------

    def problem(self, stream: str, record: dict[str, Any], now_ms: int
                ) -> tuple[str, str] | None:
        """(reason, message) for a reference record that must not be applied, or None;
        ``now_ms``: the wall clock, UTC ms (an event may not be far in the future)."""
        check = self.validator
        key, time_field = _FIELDS[stream]
        found = check.text_problem(key, record[key])
        # A roll-out may be announced ahead; other events happen when they are recorded.
        found = found or check.time_problem(time_field, record[time_field],
                                            None if stream == ZIP_CODES else now_ms)
        if found is None and stream == PAYMENTS:
            found = check.text_problem("payment_status", record["payment_status"])
        if found is None and stream == INVENTORY and not math.isfinite(record["inventory"]):
            found = ("invalid_field", f"inventory {record['inventory']} is not a number")
        return found

    def apply(self, stream: str, partition: int, records: Sequence[dict[str, Any] | None],
              offsets: Sequence[int], now: float, rejected: Iterable[tuple[int, str, str]] = ()
              ) -> Applied:
        """Apply decoded records of one partition, in offset order (``None``: did not decode;
        ``rejected``: those already found bad, as (index, reason, message)). Records that fail
        validation are returned as rejected, unapplied, and do not move the stream's time."""
        progress = self.progress.setdefault((stream, partition), PartitionProgress())
        bad = list(rejected)
        skip = {i for i, _, _ in bad}
        good: list[dict[str, Any]] = []
        now_ms = int(time.time() * 1000)
        for i, record in enumerate(records):
            if i in skip or record is None:
                continue
            found = self.problem(stream, record, now_ms)
            if found is not None:
                bad.append((i, *found))
            else:
                good.append(record)
        if offsets:  # news: the partition is not idle (note_position starts the clock again)
            progress.next_offset = max(progress.next_offset, max(offsets) + 1)
            progress.at_end_since = None
        late = self._insert(stream, partition, good) if good else 0
        if good:
            self.had_records[stream] = True
            times = [r["available_from_ms" if stream == ZIP_CODES else "timestamp_ms"]
                     for r in good]
            progress.max_event_ms = max(progress.max_event_ms, max(times))
        return Applied(len(good), late, bad)

    def _insert(self, stream: str, partition: int, good: list[dict[str, Any]]) -> int:
        tables = self.tables
        if stream == ZIP_CODES:
            ms = np.fromiter((r["available_from_ms"] for r in good), np.int64, len(good))
            seconds = event_seconds(ms)
            tables.zips.insert([r["zip_code"] for r in good], seconds,
                               np.ones(len(good), dtype=np.int8))
            upto = self.scored_upto[ZIP_CODES]
        else:
            ms = np.fromiter((r["timestamp_ms"] for r in good), np.int64, len(good))
            seconds = event_seconds(ms)
            if stream == INVENTORY:
                tables.inventory.insert([r["sku_code"] for r in good], seconds,
                                        np.fromiter((r["inventory"] for r in good),
                                                    np.float64, len(good)))
                upto = self.scored_upto[INVENTORY]
            else:
                codes = tables.statuses.encode(r["payment_status"] for r in good)
                tables.payments.partition(partition).insert(
                    [r["order_id"] for r in good], seconds, codes.astype(np.int32))
                upto = self.payments_scored_upto.get(partition, _NEVER)
        late = int(np.count_nonzero(seconds * 1000 <= upto))
        if late:
            metrics.REFERENCE_LATE.labels(stream).inc(late)
            self.log.warning("late_reference_events", stream=stream, partition=partition,
                             events=late, note="orders after them were already scored; their "
                             "predictions are not rewritten")
        metrics.REFERENCE_APPLIED.labels(stream).inc(len(good))
        self._since_retention += len(good)
        if self.retention_s is not None and self._since_retention >= _RETAIN_EVERY:
            self.retain()
        return late

    def retain(self) -> None:
        """Trim every table to the retention horizon, in event time (TRIAGE_REFERENCE_RETENTION)."""
        self._since_retention = 0
        if self.retention_s is None:
            return
        tables, horizon = self.tables, self.retention_s
        tables.inventory.retain(horizon)
        tables.zips.retain(horizon)
        for table in (tables.payments.snapshot, *tables.payments.partitions.values()):
            table.retain(horizon)

    def note_position(self, stream: str, partition: int, low: int, high: int,
                      now: float) -> None:
        """A fetch said the partition's watermarks are (``low``, ``high``)."""
        progress = self.progress.get((stream, partition))
        if progress is None:
            return
        progress.low, progress.high = max(low, 0), high
        if progress.at_end:
            if progress.at_end_since is None:
                progress.at_end_since = now
        else:
            progress.at_end_since = None

    # -- the event-time rule -------------------------------------------------------------------

    def bounds(self, stream: str, partition: int, now: float) -> tuple[int, bool]:
        """(B, idle): the partition has passed every time (UTC ms) below B by its events; with
        ``idle`` it has also sat at its high watermark for the idle time, and passes every time
        for an order that has itself waited that long (see :meth:`admit`)."""
        progress = self.progress.get((stream, partition))
        if self.snapshot and not self.had_records[stream]:
            return _ALWAYS, False  # a snapshot, and a stream that never said anything new
        if progress is None:
            return _NEVER, False
        idle = (progress.at_end_since is not None and now - progress.at_end_since >= self.idle_s
                and self.had_records[stream])
        return progress.max_event_ms, idle

    def _stream_bounds(self, stream: str, partitions: Iterable[int], now: float
                       ) -> tuple[int, int]:
        """(A, B): an order at time T has passed the partitions if T < A (the partitions that
        are not idle) and either T < B (the idle ones) or it has waited the idle time."""
        busy, idle = _ALWAYS, _ALWAYS
        found = False
        for partition in partitions:
            found = True
            bound, is_idle = self.bounds(stream, partition, now)
            if is_idle:
                idle = min(idle, bound)
            else:
                busy = min(busy, bound)
        if not found:
            return (_ALWAYS, _ALWAYS) if self.snapshot else (_NEVER, _NEVER)
        return busy, idle

    def admit(self, partitions: np.ndarray, timestamps_ms: np.ndarray, waited_s: np.ndarray,
              now: float) -> tuple[np.ndarray, np.ndarray]:
        """(ready, expired) bool arrays for a batch of orders: ready once every stream it reads
        has passed its second; expired when it is not ready but has waited for the max wait.
        ``partitions``: the orders topic partition of each (-1: read from no partition, for
        which payments are taken as they stand).

        An idle partition passes an order only once the order itself has waited the idle
        time: an event published just before the order, and not fetched yet when the order
        was, arrives meanwhile and ends the partition's idleness (a producer that paused
        would otherwise make every order of that moment miss it)."""
        needed = np.floor_divide(timestamps_ms, 1000) * 1000
        patient = waited_s >= self.idle_s
        ready = np.ones(len(needed), dtype=bool)
        behind = np.zeros(len(needed), dtype=bool)  # held back by a partition with records left
        for stream in (INVENTORY, ZIP_CODES):
            busy, idle = self._stream_bounds(stream, self.partitions(stream), now)
            ready &= (needed < busy) & ((needed < idle) | patient)
            behind |= needed >= self._backlog_bound(stream, self.partitions(stream), now)
        for partition in np.unique(partitions).tolist():
            if partition < 0:
                continue
            rows = partitions == partition
            busy, idle = self._stream_bounds(PAYMENTS, [partition], now)
            ready[rows] &= (needed[rows] < busy) & ((needed[rows] < idle) | patient[rows])
            behind[rows] |= needed[rows] >= self._backlog_bound(PAYMENTS, [partition], now)
        expired = ~ready & (waited_s >= self.max_wait_s) & ~behind
        return ready, expired

    def _backlog_bound(self, stream: str, partitions: Iterable[int], now: float) -> int:
        """The lowest time (UTC ms) still unpassed by a partition of ``partitions`` that has
        records left to read (its high watermark is past what was applied): an order at or
        after it waits for them, whatever the max wait. _ALWAYS if no partition is behind."""
        lowest = _ALWAYS
        for partition in partitions:
            progress = self.progress.get((stream, partition))
            if progress is not None and progress.high >= 0 and not progress.at_end:
                lowest = min(lowest, self.bounds(stream, partition, now)[0])
        return lowest

    def passed(self, stream: str, partition: int, now: float, waited_s: float = 0.0) -> int:
        """The partition has passed every time (UTC ms) below the value returned, for an order
        that has waited ``waited_s``."""
        busy, idle = self._stream_bounds(stream, [partition], now)
        return busy if waited_s >= self.idle_s else min(busy, idle)

    def scored(self, partitions: np.ndarray, timestamps_ms: np.ndarray) -> None:
        """Orders were scored: a reference event at or before their seconds is late now."""
        if not len(timestamps_ms):
            return
        needed = np.floor_divide(timestamps_ms, 1000) * 1000
        top = int(needed.max())
        for stream in (INVENTORY, ZIP_CODES):
            self.scored_upto[stream] = max(self.scored_upto[stream], top)
        for partition in np.unique(partitions).tolist():
            if partition >= 0:
                upto = int(needed[partitions == partition].max())
                self.payments_scored_upto[partition] = max(
                    self.payments_scored_upto.get(partition, _NEVER), upto)

    def caught_up(self, stream: str) -> bool:
        """Every tracked partition of ``stream`` is at its high watermark."""
        return all(self.progress[(stream, p)].at_end for p in self.partitions(stream))


class ReferenceReader:
    """Reads the reference topics into a :class:`ReferenceFeed` with ``assign()``.

    ``poll()`` between batches applies what has arrived and returns the dead letters to
    produce; ``restore()`` reads the global tables up to their ends before the worker joins
    the orders group. Raises ConfigurationError if payments is not co-partitioned with
    orders."""

    def __init__(self, connection: ConnectionSettings, topics: TopicSettings,
                 feed: ReferenceFeed, log: Any = None) -> None:
        self.feed = feed
        self.topics = topics
        self.log = log or structlog.get_logger("reference")
        self.consumer: Consumer = make_consumer(connection,
                                                f"triage-reference-{uuid.uuid4().hex}")
        self.stream_of = {topics.inventory_topic: INVENTORY, topics.payments_topic: PAYMENTS,
                          topics.zip_codes_topic: ZIP_CODES}
        self.codecs: dict[str, Codec] = {
            INVENTORY: codec_for(connection, "inventory", topics.inventory_topic),
            PAYMENTS: codec_for(connection, "payment", topics.payments_topic),
            ZIP_CODES: codec_for(connection, "zip_code", topics.zip_codes_topic)}
        self.missing: set[str] = set()
        self.assigned: list[TopicPartition] = []

    def start(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Assign every partition of the global streams, from the beginning (a topic that does
        not exist is logged and read as a stream without records); ``stop()`` gives up."""
        for topic in (self.topics.inventory_topic, self.topics.zip_codes_topic):
            if stop():
                return
            found = self._partitions(topic)
            self.feed.assign(self.stream_of[topic], (tp.partition for tp in found))
            self.assigned += found
        self.consumer.assign([TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING)
                              for tp in self.assigned])

    def _partitions(self, topic: str) -> list[TopicPartition]:
        try:
            return partitions_of(self.consumer, topic)
        except KafkaException as exc:
            self.missing.add(topic)
            self.log.warning("reference_topic_missing", topic=topic, error=str(exc),
                             note="orders wait for it up to TRIAGE_REFERENCE_MAX_WAIT_MS, "
                             "unless a CSV snapshot was loaded")
            return []

    def check_copartitioned(self, orders_topic: str) -> None:
        """Refuse to run when payments and orders have different partition counts: an order
        and its payments would not be on the same partition number."""
        if self.topics.payments_topic in self.missing:
            return
        payments = len(self._partitions(self.topics.payments_topic))
        orders = len(partitions_of(self.consumer, orders_topic))
        if payments and payments != orders:
            raise ConfigurationError(
                f"{self.topics.payments_topic} has {payments} partitions and {orders_topic} "
                f"{orders}: payments must be co-partitioned with orders (the same count and "
                "the Java client's partitioner) for a worker to find an order's payments; "
                "recreate one of them")

    def assign_payments(self, partitions: list[int]) -> None:
        """Orders partitions were assigned: read the same payments partitions from the start."""
        if self.topics.payments_topic in self.missing or not partitions:
            return
        self.feed.assign(PAYMENTS, partitions)
        added = [TopicPartition(self.topics.payments_topic, p, OFFSET_BEGINNING)
                 for p in partitions]
        self.consumer.incremental_assign(added)
        self.assigned += added
        self.log.info("payments_restoring", partitions=partitions)

    def revoke_payments(self, partitions: list[int]) -> None:
        if self.topics.payments_topic in self.missing or not partitions:
            return
        gone = [TopicPartition(self.topics.payments_topic, p) for p in partitions]
        self.consumer.incremental_unassign(gone)
        self.assigned = [tp for tp in self.assigned if (tp.topic, tp.partition)
                         not in {(g.topic, g.partition) for g in gone}]
        self.feed.revoke_payments(partitions)

    def poll(self, max_records: int = 20_000, timeout_s: float = 0.0
             ) -> list[tuple[Source, bytes | None, bytes | None, str, str]]:
        """Apply what has arrived (up to ``max_records``); returns the records to dead-letter
        as (source, key, value, reason, message)."""
        now = time.monotonic()
        batch = records_of(self.consumer.consume(max_records, timeout_s), self.log)
        by_partition: dict[tuple[str, int], list[Any]] = {}
        for msg in batch:
            source = source_of(msg)
            by_partition.setdefault((source.topic, source.partition), []).append((source, msg))
        letters = []
        for (topic, partition), items in by_partition.items():
            stream = self.stream_of[topic]
            codec = self.codecs[stream]
            records: list[dict[str, Any] | None] = []
            rejected = []
            for i, (_, msg) in enumerate(items):
                try:
                    records.append(codec.decode(msg.value()))
                except BadRecord as exc:
                    records.append(None)
                    rejected.append((i, exc.reason, exc.message))
            applied = self.feed.apply(stream, partition, records,
                                      [s.offset for s, _ in items], now, rejected)
            for i, reason, message in applied.rejected:
                source, msg = items[i]
                letters.append((source, msg.key(), msg.value(), reason, message))
                metrics.REFERENCE_DEAD_LETTERS.labels(stream, reason).inc()
                self.log.warning("reference_dead_lettered", stream=stream, reason=reason,
                                 error=message[:200], partition=partition,
                                 offset=source.offset)
        for tp in self.assigned:
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                self.feed.note_position(self.stream_of[tp.topic], tp.partition, low, high, now)
        return letters

    def restore(self, stream_names: Sequence[str] = (INVENTORY, ZIP_CODES),
                timeout_s: float = 600.0, stop: Callable[[], bool] = lambda: False,
                progress: Callable[[], object] = lambda: None
                ) -> list[tuple[Source, bytes | None, bytes | None, str, str]]:
        """Read ``stream_names`` up to their high watermarks (logging progress, and calling
        ``progress()``, every 2 s), unless ``stop()`` says to give up; returns the dead letters
        met on the way."""
        started = last_log = time.monotonic()
        letters = []
        progress()
        while not all(self.feed.caught_up(s) for s in stream_names) and not stop():
            letters += self.poll(timeout_s=0.1)
            now = time.monotonic()
            if now - started > timeout_s:
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT,
                                                f"reference restore took over {timeout_s} s"))
            if now - last_log >= 2.0:
                self.log.info("reference_restoring", records=self.feed.tables.size,
                              elapsed_s=round(now - started, 1))
                progress()
                last_log = now
        self.log.info("reference_restored", records=self.feed.tables.size,
                      elapsed_s=round(time.monotonic() - started, 2),
                      table_bytes=self.feed.tables.nbytes)
        return letters

    def close(self) -> None:
        self.consumer.close()
