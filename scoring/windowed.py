"""The scorer's join with the feature stage: each order's windowed feature values
(model/windows.py), as ``triage windows`` publishes them to the ``windowed_features`` topic.

**Why a stream join by order, not a state of its own.** The feature stage holds the state keyed
by entity (a customer's orders reach one task through a repartition topic) and answers each
order once every orders partition has passed its time; the scorer, whose orders are keyed by
order_id, joins those answers by ``(order_id, entity, entity value)``, as it joins a payment by
order_id. Only the stores (entities) of the windowed features that the active or the shadow
model reads are joined (``Model.windowed``): for a model that reads none, nothing is read and
the prediction's windowed features are null.

**An order waits for its answers.** An order is ready once an answer of every joined store has
arrived for it. It is scored without one when ``TRIAGE_REFERENCE_MAX_WAIT_MS`` has passed since
it was consumed and the reader has nothing left to read on the windowed topic (a reader that is
behind has the answer coming), or ``BEHIND_WAITS`` (6) times that in any case: its features of
that store are then null and the prediction's ``windowed_unknown`` says ``wait_expired`` for
each; the answer, when it comes, brings a corrected revision (with the live reference join,
which keeps the scored orders). An answer the stage marks ``window_expired`` (the order came
later than its retention) is joined as null, ``windowed_unknown`` saying ``window_expired``;
one without a value of a feature the model reads (the stage's ``TRIAGE_WINDOWED_FEATURES``
leaves it out) as null, saying ``not_computed``, with a warning in the log.

**A shadow model that reads windowed features** is joined as the active one would be: the
worker joins the stores either model reads, so its orders wait for the stage's answers even
when only the shadow reads them, and the active model's predictions carry those values (and
their corrections) too. That is the price of scoring the shadow on the very orders and
features of the active model; it is what promoting the shadow will cost anyway.

**Revisions.** Of the answers for one key the highest revision stands: a late order that
changed an answered one's values brings the next (a corrected prediction follows, reason
``late_reference:windowed_features``); revision 0 (the stage held nothing that far back) never
stands above another, and an answer of a revision already held changes nothing (a replayed
answer).

**What is read, and kept.** Every partition of the windowed topic, from the beginning, as the
payments stream is read (a global table: an answer is found whatever partition it landed on),
every store's answers. Answers are kept until the newest order this worker scored (before it
scored any: the newest answer) is ``TRIAGE_WINDOW_RETENTION_S`` later in event time than
theirs, a time capped at the clock plus ``TRIAGE_MAX_CLOCK_SKEW_MS``: an order that far behind
is answered ``window_expired`` by the stage anyway. A worker more than that behind the stage
(down for longer) finds its backlog's answers gone: those orders say ``wait_expired``. Memory:
one entry per answer of that period, for every partition (about 500 bytes each: the key's
strings and the values' dict); reading only the co-partitioned partitions would divide it by
the workers, and is left for when a deployment needs it.

:class:`WindowedJoin` is that logic without Kafka; :class:`WindowedReader` reads the topic into
it.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import structlog

from triage.bus.clients import Source
from triage.bus.errors import BadRecord, WaitTimeout
from triage.bus.global_reader import GlobalReader
from triage.bus.settings import ConnectionSettings, TopicSettings
from triage.model.windows import WINDOWED_FEATURES, WindowedFeature
from triage.model.windows import declared as by_name
from triage.schemas.codec import codec_for
from triage.scoring.feed import Letter

WAIT_EXPIRED = "wait_expired"
WINDOW_EXPIRED = "window_expired"
# The scoring core was given no join: the HTTP door, whose orders come in requests and never
# pass the feature stage, so no stage state holds them (docs/how-it-works.md).
NOT_JOINED = "not_joined"
# The stage's answer has no value of the feature: it does not compute it (its
# TRIAGE_WINDOWED_FEATURES leaves it out).
NOT_COMPUTED = "not_computed"
# An order waits for an answer past the max wait while the reader has records left to read,
# but not past this many max waits: a reader that never reaches its end (a transaction the
# stage keeps open, a partition whose end is not known) cannot hold orders for ever.
BEHIND_WAITS = 6
STREAM = "windowed_features"  # the name of the stream in corrections and metrics


class Answer(NamedTuple):
    """The stage's latest answer for one (order_id, entity, entity value)."""

    revision: int
    window_expired: bool
    values: Mapping[str, float | None]
    timestamp_ms: int  # the order's standing time, UTC ms


class Joined(NamedTuple):
    """A batch's windowed features: name -> float64 values (NaN for null), and per order the
    features whose value is unknown, with why (``wait_expired``, ``window_expired``)."""

    values: dict[str, np.ndarray]
    unknown: list[dict[str, str]]


class WindowedJoin:
    """The answers of the feature stage, and which orders may be scored (module docstring).

    ``names``: the windowed features the models read; ``max_wait_s``: the longest an order waits
    for an answer once the reader has nothing left to read (and at most ``BEHIND_WAITS`` times
    that while it has); ``retention_ms``: how far behind the newest order scored (or, before
    any, the newest answer), in event time, answers are kept; ``clock``: the wall clock (UTC
    ms), and ``skew_ms`` how far ahead of it an order's time may move that bound (an order
    stamped a day ahead must not expire every answer). ``declared``: the declarations
    (model/windows.py). Raises ValueError for a name that is not declared."""

    def __init__(self, names: Iterable[str], *, max_wait_s: float, retention_ms: int,
                 declared: Sequence[WindowedFeature] = WINDOWED_FEATURES,
                 clock: Callable[[], int] = lambda: int(time.time() * 1000),
                 skew_ms: int = 1000) -> None:
        self.declared = by_name(declared)
        self.max_wait_s = max_wait_s
        self.retention_ms = retention_ms
        self.clock = clock
        self.skew_ms = skew_ms
        self.answers: dict[tuple[str, str, str], Answer] = {}
        self._by_time: list[tuple[int, tuple[str, str, str]]] = []  # heap: (time, key)
        self.behind = False  # the reader has records left to read (WindowedReader)
        self.scored_upto: int | None = None  # the newest order time scored (UTC ms), capped
        self.newest_answer: int | None = None  # the newest answer's time (UTC ms), capped
        self.not_computed: set[str] = set()  # features read that answers came without
        self.names: tuple[str, ...] = ()
        self.entities: tuple[str, ...] = ()
        self.use(names)

    def use(self, names: Iterable[str]) -> None:
        """Join the stores of these windowed features from now on (a model swap)."""
        wanted = set(names)
        unknown = sorted(wanted - set(self.declared))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: no such windowed feature")
        self.names = tuple(name for name in self.declared if name in wanted)
        self.entities = tuple(dict.fromkeys(self.declared[n].entity for n in self.names))

    def __len__(self) -> int:
        return len(self.answers)

    def apply(self, records: Iterable[Mapping[str, Any]]) -> list[str]:
        """Take decoded ``windowed_features.avsc`` records; returns the order_ids whose answer
        changed (a first answer, or a higher revision): a kept order among them may need a
        correction."""
        changed = []
        answers = self.answers
        for record in records:
            key = (record["order_id"], record["entity"], record["entity_value"])
            revision = record["revision"]
            held = answers.get(key)
            if held is not None and (revision == 0 or revision <= held.revision):
                continue  # revision 0 never stands above another; a replay changes nothing
            at = record["timestamp_ms"]
            answers[key] = Answer(revision, record["window_expired"], record["values"], at)
            if held is None:
                heapq.heappush(self._by_time, (at, key))
            self.newest_answer = self._capped(self.newest_answer, at)
            changed.append(record["order_id"])
        return changed

    def _capped(self, newest: int | None, at: int) -> int:
        at = min(at, self.clock() + self.skew_ms)
        return at if newest is None else max(newest, at)

    def _keys(self, order: Mapping[str, Any], entity: str) -> tuple[str, str, str]:
        value = order[entity]
        return (order["order_id"], entity, "" if value is None else value)

    def admit(self, orders: Sequence[Mapping[str, Any]], waited_s: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """(ready, expired) bool arrays for decoded orders consumed ``waited_s`` seconds ago:
        ready when every joined store has answered; expired when not ready, the max wait has
        passed and the reader has nothing left to read."""
        answers = self.answers
        ready = np.fromiter((all(self._keys(o, e) in answers for e in self.entities)
                             for o in orders), dtype=bool, count=len(orders))
        waited = np.asarray(waited_s)
        long_enough = waited >= self.max_wait_s * (BEHIND_WAITS if self.behind else 1)
        return ready, ~ready & long_enough

    def lookup(self, orders: Sequence[Mapping[str, Any]]) -> Joined:
        """The joined features of decoded orders, as they stand now: unknown where no answer
        came (``wait_expired``), the stage could not know (``window_expired``) or its answer
        has no value of the feature (``not_computed``)."""
        n = len(orders)
        values = {name: np.full(n, np.nan) for name in self.names}
        unknown: list[dict[str, str]] = [{} for _ in range(n)]
        for entity in self.entities:
            names = [name for name in self.names if self.declared[name].entity == entity]
            for i, order in enumerate(orders):
                answer = self.answers.get(self._keys(order, entity))
                if answer is None or answer.window_expired:
                    why = WAIT_EXPIRED if answer is None else WINDOW_EXPIRED
                    unknown[i].update(dict.fromkeys(names, why))
                    continue
                for name in names:
                    if name not in answer.values:
                        unknown[i][name] = NOT_COMPUTED
                        self.not_computed.add(name)
                        continue
                    value = answer.values[name]
                    if value is not None:
                        values[name][i] = value
        return Joined(values, unknown)

    def scored(self, timestamps_ms: np.ndarray) -> None:
        """Orders at these times were scored: answers far enough behind the newest can go."""
        if len(timestamps_ms):
            self.scored_upto = self._capped(self.scored_upto, int(np.max(timestamps_ms)))

    def expire(self) -> int:
        """Forget the answers ``retention_ms`` behind the newest order scored (before any:
        behind the newest answer); how many. O(log n) an answer forgotten."""
        newest = self.scored_upto if self.scored_upto is not None else self.newest_answer
        if newest is None:
            return 0
        cutoff, gone, heap = newest - self.retention_ms, 0, self._by_time
        while heap and heap[0][0] < cutoff:
            _, key = heapq.heappop(heap)
            if self.answers.pop(key, None) is not None:
                gone += 1
        return gone


_EXPIRE_EVERY_S = 10.0


class WindowedReader:
    """Reads the windowed features topic (``TRIAGE_WINDOWED_FEATURES_TOPIC``) into a
    :class:`WindowedJoin`: every partition, from the beginning, with a
    :class:`~triage.bus.global_reader.GlobalReader`. ``poll()`` between batches returns the
    records that do not decode (for the reference dead-letter topic) and the order_ids whose
    answer changed."""

    def __init__(self, connection: ConnectionSettings, topics: TopicSettings,
                 join: WindowedJoin, log: Any = None) -> None:
        self.join = join
        self.log = log or structlog.get_logger("windowed")
        topic = topics.windowed_features_topic
        self.codec = codec_for(connection, "windowed_features", topic)
        # partition -> (low, high) watermarks of the latest fetch
        self.ends: dict[int, tuple[int, int]] = {}
        self.records = 0  # records read by the latest poll
        self._letters: list[Letter] = []
        self._changed: list[str] = []
        self._expired_at = time.monotonic()
        self._warned: set[str] = set()
        self.reader = GlobalReader(connection, {STREAM: topic},
                                   on_partitions=self._assign, on_records=self._apply,
                                   on_position=self._position, log=self.log)

    def _assign(self, _stream: str, partitions: list[int], _count: int) -> None:
        for partition in partitions:
            self.ends.setdefault(partition, (0, -1))

    def _position(self, _stream: str, partition: int, low: int, high: int) -> None:
        self.ends[partition] = (max(low, 0), high)

    def _apply(self, _stream: str, partition: int,
               items: Sequence[tuple[Source, Any]]) -> None:
        records = []
        for source, msg in items:
            try:
                records.append(self.codec.decode(msg.value()))
            except BadRecord as exc:
                self._letters.append(Letter(source, msg.key(), msg.value(), exc.reason,
                                            exc.message))
                self.log.warning("windowed_dead_lettered", reason=exc.reason,
                                 error=exc.message[:200], partition=partition,
                                 offset=source.offset)
        self._changed += self.join.apply(records)

    @property
    def behind(self) -> bool:
        """Some partition has records left to read, or its end is not known yet. The
        consumer's position, not the last record's offset, says where it is: the stage
        writes in transactions, whose commit markers take offsets no record has (and a
        transaction still open keeps it below the high watermark: the join's
        ``BEHIND_WAITS`` bounds the wait that costs)."""
        assigned = self.reader.assigned
        if not assigned:
            return False
        positions = self.reader.consumer.position(assigned)
        for tp in positions:
            low, high = self.ends.get(tp.partition, (0, -1))
            if high < 0 or max(tp.offset, low) < high:
                return True
        return False

    def poll(self, max_records: int = 20_000, timeout_s: float = 0.0
             ) -> tuple[list[Letter], list[str]]:
        """Apply what has arrived; (dead letters, order_ids whose answer changed)."""
        self._letters, self._changed = [], []
        self.records = self.reader.poll(max_records, timeout_s)
        self.join.behind = self.behind
        unwarned = self.join.not_computed - self._warned
        if unwarned:
            self._warned |= unwarned
            self.log.warning("windowed_features_not_computed", features=sorted(unwarned),
                             note="the feature stage's answers have no value of them (its "
                             "TRIAGE_WINDOWED_FEATURES leaves them out): they are null, and "
                             "windowed_unknown says not_computed")
        now = time.monotonic()
        if now - self._expired_at >= _EXPIRE_EVERY_S:
            self._expired_at = now
            self.join.expire()
        return self._letters, self._changed

    def start(self, stop: Callable[[], bool] = lambda: False, timeout_s: float = 600.0,
              progress: Callable[[], object] = lambda: None) -> list[Letter]:
        """Assign the topic's partitions and read them to their ends, or until 2 s bring no
        record (an open transaction of the stage keeps the position below the end); logging
        and calling ``progress()`` every 2 s. Returns the dead letters met. Raises
        WaitTimeout after ``timeout_s``."""
        started = last = last_record = time.monotonic()
        self.reader.discover()
        letters: list[Letter] = []
        while not stop():
            found, _ = self.poll(timeout_s=0.1)
            letters += found
            now = time.monotonic()
            if self.records:
                last_record = now
            if not self.behind or now - last_record >= 2.0:
                break
            if now - started > timeout_s:
                raise WaitTimeout(f"reading the windowed features took over {timeout_s} s")
            if now - last >= 2.0:
                last = now
                progress()
                self.log.info("windowed_restoring", answers=len(self.join))
        self.log.info("windowed_restored", answers=len(self.join), features=self.join.names,
                      elapsed_s=round(time.monotonic() - started, 2))
        return letters

    def close(self) -> None:
        self.reader.close()
