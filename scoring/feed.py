"""Live reference data: the reference streams (declared in model/streams.py: ``inventory``,
``payments``, ``zip_codes``) applied to a worker's as-of tables, and the event-time rule that
says when an order may be scored.

**What a worker reads.** Every partition of all three streams, from the beginning, with
``assign()``: never through a consumer group, never committed. Payments are *global* too, as a
Kafka Streams GlobalKTable is: an order's payments are found whatever partition their producer
chose. The documented placement (keyed by ``order_id``, the Java client's murmur2 partitioner,
bus/partitioner.py) is still checked record by record: a payment on a partition murmur2 would not
choose is counted (``triage_reference_misplaced_total``) and warned about, and joined right all
the same. The price is that each worker reads the whole payments stream, not a share of it.
Topics and partitions that appear after start are picked up within
``TRIAGE_METADATA_REFRESH_MS``. Records are applied between batches; the lookups stay vectorised
over a batch (model/reference.py). Times are UTC milliseconds, compared at their own precision.

**Event time decides, not arrival.** An order at time ``T`` (ms) needs every event at or before
``T``. A partition has *passed* ``T`` when it has delivered an event later than ``T``; an
event stamped later than the wall clock plus ``TRIAGE_MAX_CLOCK_SKEW_MS`` (a producer whose clock
runs ahead) moves its partition only to that bound, so that one bad clock cannot make a
partition pass hours it has not seen. A partition with nothing left to read (at the high
watermark of its fetches) is *quiet*: it passes ``T`` once the wall clock is
``TRIAGE_REFERENCE_LATENESS_MS`` past the order's time or its publication on the orders topic,
whichever is later. That allowance is the lateness of reference producers the operator
tolerates: a payment published up to that long after its order is still joined with it (a
payment service a second behind the order service is normal), and it is the latency a quiet
stream costs. With a CSV snapshot loaded, a stream that has had no record holds no news: it has
passed everything. Without one, it has passed nothing. An order is scored once every partition
of every stream has passed its time, or when ``TRIAGE_REFERENCE_MAX_WAIT_MS`` has passed since it
was consumed and no partition that holds it back has records left to read: then its prediction
says ``reference_wait_expired`` and ``triage_reference_wait_expired_total`` counts it. A reader
that is merely behind (a replay at full speed, a restart, a worker short of CPU) has the order's
events coming, so the order waits for them, as Kafka Streams waits on a partition with known lag
(KIP-695), and ``TRIAGE_MAX_WAITING_ORDERS`` pauses its orders partition meanwhile. "Records
left" is what the fetches' high watermarks say; a partition whose watermark is unknown (not
fetched yet) holds an order until it delivers a later event or the max wait runs out. The
features then equal ``pandas.merge_asof`` over the complete history. (Within the skew, an event
stamped ahead moves its partition past orders of the next second at once: a payment for one
of those published later than it is corrected, not waited for.)

**Late events are corrected, not dropped.** An event that arrives after an order it applies to
was scored (later than the allowance, or out of order within its partition) is returned by
:meth:`ReferenceFeed.apply` as *late*; the scoring core looks up the orders it scored recently
that the event's key and time touch, and publishes a corrected prediction for each whose
features changed (scoring/corrections.py).

**Bad reference records** (that do not decode or validate, or hold a value the tables cannot:
a time before 1900 or from 2400 on, such as the "forever" date 9999-12-31; a stock level that is
not a number) go to the reference dead-letter topic with their reason and do not move their
stream's progress. No record stops the reader: whatever a table refuses is dead-lettered. After
a restart the streams are read again from the beginning, so a bad record is dead-lettered again.

:class:`ReferenceFeed` is that logic without Kafka; :class:`ReferenceReader` reads the topics
into it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import structlog

from triage.bus.clients import Source
from triage.bus.errors import BadRecord, WaitTimeout
from triage.bus.global_reader import GlobalReader
from triage.bus.partitioner import partitions_for
from triage.bus.settings import ConnectionSettings, SettingsError, TopicSettings
from triage.model.asof import TIME_MAX, TIME_MIN
from triage.model.reference import ReferenceTables
from triage.schemas.codec import Codec, codec_for
from triage.scoring import metrics
from triage.scoring.settings import ReferenceSettings
from triage.scoring.validation import OrderValidator

_NEVER = -(2**62)      # "passed nothing"
_ALWAYS = 2**62        # "passed every time"
_RETAIN_EVERY = 100_000  # apply retention after this many records (it is O(table))
_WARN_EVERY_S = 60.0   # at most one misplaced-records warning per stream this often


@dataclass
class PartitionProgress:
    """How far one reference partition has been read."""

    max_event_ms: int = _NEVER       # latest event time applied (UTC ms), capped by the skew
    next_offset: int = 0             # the next offset to read
    low: int = 0                     # low and high watermarks from the latest fetch; -1: none
    high: int = -1

    @property
    def at_end(self) -> bool:
        return self.high >= 0 and max(self.next_offset, self.low) >= self.high

    @property
    def behind(self) -> bool:
        """It has records left to read, by its fetches' high watermark."""
        return self.high >= 0 and not self.at_end


class LateEvent(NamedTuple):
    """An applied reference event at or before the latest order time scored: orders it
    applies to may have been scored without it."""

    stream: str
    key: str
    time_ms: int


@dataclass(frozen=True)
class Applied:
    """What applying a batch of reference records did."""

    applied: int = 0
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (index, reason, msg)
    late: list[LateEvent] = field(default_factory=list)
    misplaced: int = 0


class ReferenceFeed:
    """The worker's reference tables and how far each stream has been read (module docstring).

    ``snapshot``: a CSV snapshot was loaded first. ``clock``: the wall clock, UTC ms (a test
    gives a simulated one).
    """

    def __init__(self, tables: ReferenceTables, settings: ReferenceSettings,
                 validator: OrderValidator, *, snapshot: bool, log: Any = None,
                 clock: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        self.tables = tables
        self.streams = tables.streams  # name -> declaration (model/streams.py)
        self.lateness_ms = settings.reference_lateness_ms
        self.skew_ms = settings.max_clock_skew_ms
        self.max_wait_s = settings.reference_max_wait_ms / 1000.0
        self.retention_ms = None if settings.retention_s is None else settings.retention_s * 1000
        self.validator = validator
        self.snapshot = snapshot
        self.clock = clock
        self.log = log or structlog.get_logger("reference")
        self.progress: dict[tuple[str, int], PartitionProgress] = {}
        self.partition_counts: dict[str, int] = {}
        self.had_records = dict.fromkeys(self.streams, False)
        self.scored_upto = _NEVER  # latest order time (UTC ms) scored: events up to it are late
        self.misplaced: dict[str, int] = dict.fromkeys(self.streams, 0)
        self._warned_at: dict[str, float] = {}
        self._since_retention = 0

    # -- partitions ------------------------------------------------------------------------

    def assign(self, stream: str, partitions: Iterable[int], count: int | None = None) -> None:
        """Start tracking partitions of ``stream``, read from the beginning; ``count``: how
        many partitions its topic has now (for the placement check of co-partitioned streams)."""
        for partition in partitions:
            self.progress.setdefault((stream, partition), PartitionProgress())
        if count is not None:
            self.partition_counts[stream] = count

    def partitions(self, stream: str) -> list[int]:
        return sorted(p for s, p in self.progress if s == stream)

    # -- records -----------------------------------------------------------------------------

    def problem(self, stream: str, record: dict[str, Any], now_ms: int
                ) -> tuple[str, str] | None:
        """(reason, message) for a reference record that must not be applied, or None;
        ``now_ms``: the wall clock, UTC ms (an event may not be far in the future)."""
        check = self.validator
        spec = self.streams[stream]
        found = check.text_problem(spec.key, record[spec.key])
        at = record[spec.time]
        if found is None and not TIME_MIN <= at < TIME_MAX:
            found = ("invalid_timestamp", f"{spec.time} {at} is outside the times the tables "
                     "hold (1900-01-01 to 2399-12-31 UTC)")
        # A roll-out may be announced ahead; other events happen when they are recorded.
        found = found or check.time_problem(spec.time, at,
                                            None if spec.announced_ahead else now_ms)
        if found is None and spec.kind == "category":
            found = check.text_problem(spec.value or "", record[spec.value or ""])
        if found is None and spec.kind == "number" and not math.isfinite(record[spec.value
                                                                                or ""]):
            found = ("invalid_field", f"{spec.value} {record[spec.value or '']} is not a number")
        return found

    def apply(self, stream: str, partition: int, records: Sequence[dict[str, Any] | None],
              offsets: Sequence[int], rejected: Iterable[tuple[int, str, str]] = ()
              ) -> Applied:
        """Apply decoded records of one partition, in offset order (``None``: did not decode;
        ``rejected``: those already found bad, as (index, reason, message)). Records that fail
        validation, or that a table refuses, are returned as rejected, unapplied, and do not
        move the stream's time. Never raises for a record's content."""
        progress = self.progress.setdefault((stream, partition), PartitionProgress())
        bad = list(rejected)
        skip = {i for i, _, _ in bad}
        good: list[dict[str, Any]] = []
        indices: list[int] = []
        now_ms = self.clock()
        for i, record in enumerate(records):
            if i in skip or record is None:
                continue
            found = self.problem(stream, record, now_ms)
            if found is not None:
                bad.append((i, *found))
            else:
                good.append(record)
                indices.append(i)
        if offsets:  # news: where the partition has been read to
            progress.next_offset = max(progress.next_offset, max(offsets) + 1)
        if not good:
            return Applied(0, bad)
        try:
            self._insert(stream, good)
        except (ValueError, TypeError, OverflowError):  # what a check above did not foresee
            kept = []
            for i, record in zip(indices, good, strict=True):
                try:
                    self._insert(stream, [record])
                    kept.append(record)
                except (ValueError, TypeError, OverflowError) as exc:
                    bad.append((i, "invalid_field", f"the {stream} table refused it: {exc}"))
            good = kept
            if not good:
                return Applied(0, bad)
        spec = self.streams[stream]
        self.had_records[stream] = True
        times = [r[spec.time] for r in good]
        # An event stamped ahead of the clock moves its partition only to the clock + skew.
        progress.max_event_ms = max(progress.max_event_ms, min(max(times), now_ms + self.skew_ms))
        metrics.REFERENCE_APPLIED.labels(stream).inc(len(good))
        late = [LateEvent(stream, r[spec.key], t) for r, t in zip(good, times, strict=True)
                if t <= self.scored_upto]
        misplaced = self._check_placement(stream, partition, good) if spec.co_partitioned else 0
        self._since_retention += len(good)
        if self.retention_ms is not None and self._since_retention >= _RETAIN_EVERY:
            self.retain()
        return Applied(len(good), bad, late, misplaced)

    def _insert(self, stream: str, good: list[dict[str, Any]]) -> None:
        self.tables.insert(stream, good)

    def _check_placement(self, stream: str, partition: int, good: list[dict[str, Any]]) -> int:
        """Count (and warn about, at most once a minute) records on a partition the documented
        partitioner would not choose for their key; they are applied all the same."""
        count = self.partition_counts.get(stream)
        if not count:
            return 0
        key = self.streams[stream].key
        expected = partitions_for([r[key].encode() for r in good], count)
        wrong = int(np.count_nonzero(expected != partition))
        if wrong:
            self.misplaced[stream] += wrong
            metrics.REFERENCE_MISPLACED.labels(stream).inc(wrong)
            now = time.monotonic()
            if now - self._warned_at.get(stream, -_WARN_EVERY_S) >= _WARN_EVERY_S:
                self._warned_at[stream] = now
                example = good[int(np.flatnonzero(expected != partition)[0])][key]
                self.log.warning(
                    "reference_records_misplaced", stream=stream, partition=partition,
                    records=wrong, total=self.misplaced[stream], example_key=example,
                    note=f"murmur2 of the key would choose another of the {count} partitions: "
                         "the producer is not using the Java client's partitioner "
                         "(librdkafka: partitioner=murmur2_random). Joined right all the same: "
                         "every worker reads every partition")
        return wrong

    def retain(self) -> None:
        """Trim every table to the retention horizon, in event time (TRIAGE_REFERENCE_RETENTION)."""
        self._since_retention = 0
        if self.retention_ms is not None:
            self.tables.retain(self.retention_ms)

    def note_position(self, stream: str, partition: int, low: int, high: int) -> None:
        """A fetch said the partition's watermarks are (``low``, ``high``)."""
        progress = self.progress.get((stream, partition))
        if progress is not None:
            progress.low, progress.high = max(low, 0), high

    # -- the event-time rule -------------------------------------------------------------------

    def admit(self, timestamps_ms: np.ndarray, published_ms: np.ndarray, waited_s: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """(ready, expired) bool arrays for a batch of orders at ``timestamps_ms``, published
        on the orders topic at ``published_ms`` (UTC ms; an order from no topic: its own
        time), consumed ``waited_s`` seconds ago: ready once every partition of every stream
        has passed its time; expired when it is not ready but has waited for the max wait and
        no partition that holds it back has records left to read."""
        now_ms = self.clock()
        needed = np.asarray(timestamps_ms, dtype=np.int64)
        # A quiet partition passes an order once the allowance has run from the later of its
        # time and its publication.
        patient = now_ms >= np.maximum(needed, published_ms) + self.lateness_ms
        ready = np.ones(len(needed), dtype=bool)
        behind = np.zeros(len(needed), dtype=bool)
        for stream in self.streams:
            busy, quiet, lagging = self._stream_bounds(stream)
            ready &= (needed < busy) & ((needed < quiet) | patient)
            behind |= needed >= lagging
        expired = ~ready & (waited_s >= self.max_wait_s) & ~behind
        return ready, expired

    def _stream_bounds(self, stream: str) -> tuple[int, int, int]:
        """(busy, quiet, lagging) for ``stream``: an order at time T has passed its partitions
        if T < busy (the partitions with records to come or an unknown end) and either T <
        quiet (the quiet ones) or the allowance has run; it is held back by a partition with
        records left to read if T >= lagging."""
        partitions = [p for (s, p) in self.progress if s == stream]
        if self.snapshot and not self.had_records[stream]:
            return _ALWAYS, _ALWAYS, _ALWAYS  # a snapshot, and no news since
        if not partitions:
            return _NEVER, _NEVER, _ALWAYS
        busy = quiet = lagging = _ALWAYS
        for partition in partitions:
            progress = self.progress[(stream, partition)]
            bound = progress.max_event_ms
            if progress.at_end and (self.had_records[stream] or self.snapshot):
                quiet = min(quiet, bound)
            else:
                busy = min(busy, bound)
            if progress.behind:
                lagging = min(lagging, bound)
        return busy, quiet, lagging

    def scored(self, timestamps_ms: np.ndarray) -> None:
        """Orders were scored: a reference event at or before their times is late now."""
        if len(timestamps_ms):
            self.scored_upto = max(self.scored_upto, int(np.max(timestamps_ms)))

    def caught_up(self, stream: str) -> bool:
        """Every tracked partition of ``stream`` is at its high watermark."""
        return all(self.progress[(stream, p)].at_end for p in self.partitions(stream))


class Letter(NamedTuple):
    """A reference record for the reference dead-letter topic."""

    source: Source
    key: bytes | None
    value: bytes | None
    reason: str
    message: str


class Polled(NamedTuple):
    """What a poll of the reference topics did: records to dead-letter, late events."""

    letters: list[Letter]
    late: list[LateEvent]


class ReferenceReader:
    """Reads the reference topics into a :class:`ReferenceFeed`: every partition of every
    stream, from the beginning, including topics and partitions that appear later (a
    :class:`~triage.bus.global_reader.GlobalReader`), decoding each record with its stream's
    codec.

    ``poll()`` between batches applies what has arrived and returns the dead letters to produce
    and the late events; ``restore()`` reads the streams up to their ends before the worker
    joins the orders group. Raises SettingsError for a topic setting of a stream no one
    declared (``TRIAGE_<STREAM>_TOPIC``: a misspelt variable)."""

    def __init__(self, connection: ConnectionSettings, topics: TopicSettings,
                 feed: ReferenceFeed, log: Any = None) -> None:
        self.feed = feed
        self.log = log or structlog.get_logger("reference")
        streams = feed.streams.values()
        unknown = sorted(set(dict(topics.stream_topics)) - set(feed.streams))
        if unknown:
            raise SettingsError(
                f"{', '.join(f'TRIAGE_{name.upper()}_TOPIC' for name in unknown)} names no "
                f"reference stream; the streams are {', '.join(feed.streams)} "
                "(model/streams.py)")
        self.topic_of = {s.name: topics.topic_of(s.name) for s in streams}
        self.codecs: dict[str, Codec] = {
            s.name: codec_for(connection, s.schema, self.topic_of[s.name]) for s in streams}
        self._letters: list[Letter] = []
        self._late: list[LateEvent] = []
        self.reader = GlobalReader(
            connection, self.topic_of,
            on_partitions=lambda stream, new, count: feed.assign(stream, new, count),
            on_records=self._apply, on_position=feed.note_position,
            co_partitioned={self.topic_of[s.name]: topics.orders_topic
                            for s in streams if s.co_partitioned},
            log=self.log)

    def start(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Assign every partition of the streams, from the beginning (a topic that does not
        exist is logged, read as a stream without records, and looked for again); ``stop()``
        gives up."""
        if not stop():
            self.reader.discover()

    def _apply(self, stream: str, partition: int,
               items: Sequence[tuple[Source, Any]]) -> None:
        codec = self.codecs[stream]
        records: list[dict[str, Any] | None] = []
        rejected = []
        for i, (_, msg) in enumerate(items):
            try:
                records.append(codec.decode(msg.value()))
            except BadRecord as exc:
                records.append(None)
                rejected.append((i, exc.reason, exc.message))
        applied = self.feed.apply(stream, partition, records, [s.offset for s, _ in items],
                                  rejected)
        self._late += applied.late
        for i, reason, message in applied.rejected:
            source, msg = items[i]
            self._letters.append(Letter(source, msg.key(), msg.value(), reason, message))
            metrics.REFERENCE_DEAD_LETTERS.labels(stream, reason).inc()
            self.log.warning("reference_dead_lettered", stream=stream, reason=reason,
                             error=message[:200], partition=partition, offset=source.offset)

    def poll(self, max_records: int = 20_000, timeout_s: float = 0.0) -> Polled:
        """Apply what has arrived (up to ``max_records``), after looking for new topics and
        partitions if it is time; returns the records to dead-letter and the late events."""
        self._letters, self._late = [], []
        self.reader.poll(max_records, timeout_s)
        return Polled(self._letters, self._late)

    def restore(self, stream_names: Sequence[str] | None = None, timeout_s: float = 600.0,
                stop: Callable[[], bool] = lambda: False,
                progress: Callable[[], object] = lambda: None) -> list[Letter]:
        """Read ``stream_names`` up to their high watermarks (logging progress, and calling
        ``progress()``, every 2 s), unless ``stop()`` says to give up; returns the dead letters
        met on the way. ``stream_names``: default every declared stream. Raises WaitTimeout
        after ``timeout_s``."""
        stream_names = list(self.feed.streams) if stream_names is None else stream_names
        started = last_log = time.monotonic()
        letters = []
        progress()
        while not all(self.feed.caught_up(s) for s in stream_names) and not stop():
            letters += self.poll(timeout_s=0.1).letters
            now = time.monotonic()
            if now - started > timeout_s:
                raise WaitTimeout(f"reference restore took over {timeout_s} s")
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
        self.reader.close()
