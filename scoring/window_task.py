"""One task of the feature stage: the window store of one entity's repartition partition, with
its event-time watermark, what it emitted, and its changelog. No Kafka in it: the stage
(consumer/window_stage.py) feeds it the partition's records and publishes what it returns;
the tests drive it directly (tests/unit/test_window_task.py).

**What reaches a task.** Orders of the entities the repartition partitioner sends to its
partition, from every partition of the orders topic, each with its publication time on the
orders topic (UTC ms), and the orders partitions' marks: a marker ``(u, m, q)`` says that the
stage instance reading orders partition ``u`` has forwarded every order it read there, that
the latest order time it read there is ``m``, and that ``u`` had nothing left to read when the
clock was ``q`` plus ``TRIAGE_REFERENCE_LATENESS_MS``.

**When an order is answered: the live join's rule.** An order at time ``T``, published at
``P``, needs every orders partition to have *passed* it (scoring/feed.py): a partition passes
it when it delivered a later order (``m > T``: an order at ``T`` itself may still be followed
by one at ``T`` with a smaller order_id, which comes before it), or when it was quiet with the
clock the lateness past ``T`` and ``P``, whichever is later (``q >= max(T, P)``). Read per
partition, that is a test of every waiting order on every marker; the task reads it with two
sufficient conditions that cost a heap each: every partition delivered a later order
(``T < min m``), or every partition passed ``max(T, P)`` one way or the other
(``max(T, P) <= min max(m - 1, q)``).
The one case they leave waiting (some partitions passed ``T`` but not ``max(T, P)``, and
were not quiet since, while others were quiet) ends when those go quiet or deliver a later
order: later, not wrong. A partition that has sent no marker holds every order, as a
repartitioned stream's watermark is the minimum over its upstream partitions in Kafka
Streams and Flink. An answered order's value equals the offline value (model/windows.py)
once no order before it arrives later.

**Corrections.** An order that arrives after orders it changes were answered (out of order
by more than its partition had passed, or published later than the lateness allowance) makes
the task answer each of them again with the next revision when its values changed, as the
live join corrects its predictions; it is answered itself by the rule above. The *frontier*
is the latest time of an order answered, and the *horizon* ``retention_ms`` before it. An
order that stands before the horizon is answered with ``window_expired: true`` and no values
(its windows may have been forgotten); an answered order before the horizon that a late
order changes is answered again the same way (the next revision, ``window_expired``): it
could not know, and says so. A record standing more than ``retention_ms`` and the longest
window before the horizon is further back than the task holds anything: it may be of an order
answered and forgotten (a redelivery), or new; either way it is answered ``window_expired``
with revision 0, which never stands above an earlier answer, and not kept; it is counted
(``beyond_retention``), as what it changes among orders already forgotten cannot be flagged.

**Changelog.** Every change of a (order, entity value) (its standing record, the latest
record's time, what was emitted) is one record keyed by ``[order_id, entity value]`` (JSON),
a tombstone once the task forgets it, and the watermarks one record keyed ``"marks"``.
:meth:`WindowTask.restore` rebuilds a task from them (the last record of each key, as
compaction keeps): the stage restores a partition's task from its changelog partition when it
is assigned, then reads the repartition partition on from its committed offset. Changelog,
outputs and offsets go in one Kafka transaction, so a restored task is the task that
committed (the tests hold a restarted task's outputs to those of one never restarted).
"""

from __future__ import annotations

import bisect
import gc
import heapq
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any

from triage.model.windows import (
    TIE_BREAK,
    Expired,
    WindowedFeature,
    WindowState,
    rank_of,
)

MIN_MS = -(2**63)
MARKS_KEY = b'"marks"'
Key = tuple[str, str]  # (order_id, entity value)
ORDER_FIELDS = ("order_id", "timestamp_ms", *TIE_BREAK)


@dataclass(frozen=True)
class WindowOutput:
    """One order's windowed values as the stage publishes them (schemas/windowed_features.avsc):
    ``values``, feature name -> float (counts as floats) or None (seconds_since_last with no
    earlier order, or every value when ``window_expired``); ``timestamp_ms``: the time of the
    order's standing record, UTC ms; ``revision``: 1 first, one more for each correction; 0
    for a record further back than the store holds anything (``window_expired``: it may
    repeat an order answered before, and never stands above that answer)."""

    order_id: str
    timestamp_ms: int
    entity: str
    entity_value: str
    revision: int
    values: dict[str, float | None]
    window_expired: bool = False

    def record(self) -> dict[str, Any]:
        """The Avro record."""
        return {"order_id": self.order_id, "timestamp_ms": self.timestamp_ms,
                "entity": self.entity, "entity_value": self.entity_value,
                "revision": self.revision, "window_expired": self.window_expired,
                "values": dict(self.values)}


@dataclass(slots=True)
class _Entry:
    order: dict[str, Any]  # the standing record: ORDER_FIELDS
    rank: tuple[Any, ...]
    published: int  # the standing record's publication on the orders topic, UTC ms
    latest: int  # the latest time of the order's records, UTC ms
    revision: int = 0  # 0: not answered yet
    values: tuple[Any, ...] | None = None
    expired: bool = False
    time: int = field(init=False)  # the standing record's, UTC ms

    def __post_init__(self) -> None:
        self.time = int(self.rank[0])

    def stand(self, order: dict[str, Any], rank: tuple[Any, ...], published: int) -> None:
        """An earlier record of the order stands now."""
        self.order, self.rank, self.published, self.time = order, rank, published, rank[0]

    @property
    def needs(self) -> int:
        """max(T, P): what a quiet partition must have passed."""
        return max(self.time, self.published)


class WindowTask:
    """The task of one partition of one entity's store (module docstring).

    ``features``: the entity's windowed features (one :class:`WindowState` holds them all);
    ``upstream``: partitions of the orders topic (markers from a partition past the count
    extend it); ``retention_ms``: how far behind the frontier (event time, ms) orders are kept
    for corrections and deduplication.

    :meth:`add` an order and :meth:`advance` a partition's marks return the outputs to
    publish; :meth:`changes` the changelog records since the last call. Raises ValueError
    for features of another entity."""

    def __init__(self, entity: str, features: Sequence[WindowedFeature], upstream: int,
                 retention_ms: int) -> None:
        if not features or any(f.entity != entity for f in features):
            raise ValueError(f"a task of {entity} takes that entity's features, at least one")
        self.entity, self.features = entity, tuple(features)
        self.upstream, self.retention_ms = upstream, retention_ms
        self.longest = max(f.window_ms for f in features)
        # The state forgets an order when the task does: retention_ms past the longest window.
        self.state = WindowState(features, dedup_ms=retention_ms)
        # entity value -> its orders held, sorted by (time, order_id)
        self._by_entity: dict[str, list[tuple[int, str]]] = {}
        self.marks: dict[int, tuple[int, int]] = {}  # partition -> (m, q), UTC ms
        self.frontier = MIN_MS  # the latest time of an order answered
        self.entries: dict[Key, _Entry] = {}
        self.beyond_retention = 0  # late orders that may change orders no longer held
        self._busy_pass = self._quiet_pass = MIN_MS  # see _passes
        self._by_time: list[tuple[int, str, str]] = []  # waiting: (T, order_id, value)
        self._by_needs: list[tuple[int, str, str]] = []  # waiting: (max(T, P), ...)
        self._latest: list[tuple[int, str, str]] = []  # heap: (latest, order_id, value)
        self._dirty: set[Key] = set()
        self._marks_dirty = False

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def horizon(self) -> int:
        """Orders standing before it are answered ``window_expired``, UTC ms."""
        return self.frontier - self.retention_ms if self.frontier > MIN_MS else MIN_MS

    @property
    def waiting(self) -> int:
        """Orders not answered yet."""
        return sum(1 for entry in self.entries.values() if not entry.revision)

    # --- input ---------------------------------------------------------------------------------

    def add(self, order: Mapping[str, Any], published_ms: int) -> list[WindowOutput]:
        """An order record (``order.avsc``'s fields) of this partition, published on the
        orders topic at ``published_ms`` (UTC ms); its entity value is not empty (the stage
        answers those itself: :func:`missing_output`)."""
        value = order[self.entity]
        key = (order["order_id"], "" if value is None else value)
        rank = rank_of(order)
        self.state.add(order, rank)
        entry = self.entries.get(key)
        if entry is not None and entry.rank <= rank:
            if rank[0] > entry.latest:
                entry.latest = rank[0]
                heapq.heappush(self._latest, (rank[0], *key))
                self._dirty.add(key)
            return []
        earlier = None if entry is None else entry.time
        standing = {name: order[name] for name in ORDER_FIELDS}
        standing["timestamp_ms"] = rank[0]
        if entry is None and rank[0] <= self.horizon - self.longest - self.retention_ms:
            # Further back than the task holds anything: it may be an order answered and
            # forgotten. Revision 0 never stands above an earlier answer; it is not kept.
            self.beyond_retention += 1
            outputs = [WindowOutput(key[0], rank[0], self.entity, key[1], 0,
                                    dict.fromkeys(f.name for f in self.features), True)]
            return outputs + self._emit(self._answered_between(key[1], rank[0],
                                                               rank[0] + self.longest))
        if entry is None:
            entry = self.entries[key] = _Entry(standing, rank, published_ms, rank[0])
        else:
            self._unindex(key, entry.time)
            entry.stand(standing, rank, published_ms)
        bisect.insort(self._by_entity.setdefault(key[1], []), (entry.time, key[0]))
        heapq.heappush(self._latest, (entry.latest, *key))
        self._dirty.add(key)
        # The answered orders it changes: from its time, or its earlier record's, to a window
        # past the later of them.
        start = rank[0] if earlier is None else min(rank[0], earlier)
        end = (rank[0] if earlier is None else max(rank[0], earlier)) + self.longest
        changed = self._answered_between(key[1], start, end)
        if entry.revision or self._passed(entry) or entry.time < self.horizon:
            changed.insert(0, key)
        else:
            heapq.heappush(self._by_time, (entry.time, *key))
            heapq.heappush(self._by_needs, (entry.needs, *key))
        return self._emit(changed)

    def advance(self, upstream: int, mark: int, quiet: int = MIN_MS) -> list[WindowOutput]:
        """Orders partition ``upstream`` delivered orders up to ``mark`` and was quiet at
        ``quiet`` (UTC ms, module docstring): answer every waiting order the partitions have
        now passed, in (time, order_id) order, and forget what the new horizon leaves."""
        old = self.marks.get(upstream, (MIN_MS, MIN_MS))
        new = (max(old[0], mark), max(old[1], quiet))
        if new == old:
            return []
        self.marks[upstream] = new
        self._marks_dirty = True
        self.upstream = max(self.upstream, upstream + 1)
        self._passes()
        ready: list[tuple[int, str, str]] = []  # (T, order_id, value)
        for heap, bound, by_needs in ((self._by_time, self._busy_pass, False),
                                      (self._by_needs, self._quiet_pass, True)):
            while heap and heap[0][0] <= bound:
                popped, order_id, value = heapq.heappop(heap)
                entry = self.entries.get((order_id, value))
                # An entry pushed for a record since replaced, or for an order since forgotten
                # and read again, is stale: only the one of the standing record counts.
                if entry is not None and not entry.revision and popped == (
                        entry.needs if by_needs else entry.time):
                    ready.append((entry.time, order_id, value))
        ready.sort()  # (time, order_id) order; an order popped from both heaps is emitted once
        outputs = self._emit([(order_id, value) for _, order_id, value in ready])
        # Waiting orders the frontier has left more than the retention behind: expired.
        behind: list[Key] = []
        while self._by_time and self._by_time[0][0] < self.horizon:
            popped, order_id, value = heapq.heappop(self._by_time)
            entry = self.entries.get((order_id, value))
            if entry is not None and not entry.revision and entry.time == popped:
                behind.append((order_id, value))
        outputs += self._emit(behind)
        self._expire()
        return outputs

    def _passes(self) -> None:
        """What every orders partition has passed: by a later order (busy: strictly later,
        as ties at one millisecond are ordered by order_id), or one way or the other."""
        marks = [self.marks.get(u, (MIN_MS, MIN_MS)) for u in range(self.upstream)]
        self._busy_pass = min(m for m, _ in marks) - 1
        self._quiet_pass = min(max(m - 1, q) for m, q in marks)

    def _passed(self, entry: _Entry) -> bool:
        return entry.time <= self._busy_pass or entry.needs <= self._quiet_pass

    # --- output --------------------------------------------------------------------------------

    def _answered_between(self, value: str, start: int, end: int) -> list[Key]:
        """Answered orders of entity ``value`` standing at times in ``[start, end)``."""
        held = self._by_entity.get(value, [])
        found = []
        for time, order_id in held[bisect.bisect_left(held, (start,)):]:
            if time >= end:
                break
            if self.entries[(order_id, value)].revision:
                found.append((order_id, value))
        return found

    def _unindex(self, key: Key, time: int) -> None:
        held = self._by_entity[key[1]]
        del held[bisect.bisect_left(held, (time, key[0]))]
        if not held:
            del self._by_entity[key[1]]

    def _emit(self, keys: Iterable[Key]) -> list[WindowOutput]:
        outputs = []
        horizon = self.horizon  # as it stood before these: a waiting order is not late
        for key in dict.fromkeys(keys):
            entry = self.entries[key]
            if entry.time < horizon:  # its windows may be forgotten: it could not know
                values: tuple[Any, ...] | None = None
            else:
                try:
                    values = self.state.values(entry.order)
                except Expired:
                    values = None
            if entry.revision and values == entry.values and entry.expired == (values is None):
                continue
            entry.revision += 1
            entry.values, entry.expired = values, values is None
            if entry.time > self.frontier:
                self.frontier = entry.time
                self._marks_dirty = True  # the record of the marks holds the frontier too
            self._dirty.add(key)
            outputs.append(self._output(key, entry))
        return outputs

    def _output(self, key: Key, entry: _Entry) -> WindowOutput:
        names = [f.name for f in self.features]
        values: dict[str, float | None] = (
            dict.fromkeys(names) if entry.values is None else
            {name: None if v is None else float(v)
             for name, v in zip(names, entry.values, strict=True)})
        return WindowOutput(key[0], entry.time, self.entity, key[1], entry.revision,
                            values, entry.expired)

    def _expire(self) -> None:
        horizon = self.horizon
        self.state.expire(horizon)
        forget = horizon - self.longest - self.retention_ms
        while self._latest and self._latest[0][0] <= forget:
            latest, order_id, value = heapq.heappop(self._latest)
            entry = self.entries.get((order_id, value))
            if entry is not None and entry.latest == latest and entry.revision:
                del self.entries[(order_id, value)]
                self._unindex((order_id, value), entry.time)
                self._dirty.add((order_id, value))

    # --- changelog -----------------------------------------------------------------------------

    def changes(self) -> list[tuple[bytes, bytes | None]]:
        """The changelog records since the last call: (key, value or None for a tombstone)."""
        out: list[tuple[bytes, bytes | None]] = []
        for key in sorted(self._dirty):
            entry = self.entries.get(key)
            out.append((changelog_key(key), None if entry is None else json.dumps(
                {"order": entry.order, "published": entry.published, "latest": entry.latest,
                 "revision": entry.revision, "values": entry.values,
                 "expired": entry.expired}).encode()))
        self._dirty.clear()
        if self._marks_dirty:
            out.append((MARKS_KEY, json.dumps(
                {"marks": {str(u): list(m) for u, m in sorted(self.marks.items())},
                 "frontier": self.frontier}).encode()))
            self._marks_dirty = False
        return out

    def restore(self, records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
        """Rebuild from changelog records (key, value) in their order, onto a new task: the
        last record of each key stands, a tombstone removes it. Returns the orders restored.
        Raises ValueError for a record that is not this module's.

        Python's cyclic garbage collector is paused meanwhile: the state is millions of
        long-lived tuples and lists, none of them garbage, and each collection of the oldest
        generation walks them all (restoring 300,000 keys took 8.3 s with it, 5.1 s
        without: `triage bench --windows`, docs/benchmarks.md)."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._restore(records)
        finally:
            if collecting:
                gc.enable()

    def _restore(self, records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
        latest: dict[bytes, bytes | None] = {}
        for key, value in records:
            if key is None:
                raise ValueError("a changelog record without a key")
            latest[key] = value
        marks = latest.pop(MARKS_KEY, None)
        if marks is not None:
            saved = _json(marks)
            self.marks = {int(u): (int(m), int(q)) for u, (m, q) in saved["marks"].items()}
            self.upstream = max([self.upstream, *(u + 1 for u in self.marks)])
            self.frontier = int(saved["frontier"])
            self._passes()
        # In bulk: lists and heaps filled, then sorted and heapified once. The key is the
        # value's own (order_id, entity value): it need not be read.
        loaded: list[tuple[dict[str, Any], tuple[Any, ...], int]] = []
        for value in latest.values():
            if value is None:
                continue
            saved = _json(value)
            order = saved["order"]
            entry = _Entry(order, rank_of(order), int(saved["published"]),
                           int(saved["latest"]), int(saved["revision"]),
                           None if saved["values"] is None else tuple(saved["values"]),
                           bool(saved["expired"]))
            order_id, entity_value = order["order_id"], order[self.entity] or ""
            self.entries[(order_id, entity_value)] = entry
            loaded.append((order, entry.rank, entry.latest))
            self._by_entity.setdefault(entity_value, []).append((entry.time, order_id))
            self._latest.append((entry.latest, order_id, entity_value))
            if not entry.revision:
                self._by_time.append((entry.time, order_id, entity_value))
                self._by_needs.append((entry.needs, order_id, entity_value))
        self.state.load(loaded)
        for held in self._by_entity.values():
            held.sort()
        for heap in (self._latest, self._by_time, self._by_needs):
            heapq.heapify(heap)
        self._dirty.clear()  # what was restored is in the changelog already
        self._expire()  # what it forgets gets its tombstone with the task's next changes
        return len(self.entries)


def changelog_key(key: Key) -> bytes:
    """The changelog key of (order_id, entity value): ``json.dumps([order_id, value])``'s
    bytes exactly (compaction keeps one record a key, so a key must never change its
    bytes), built from the json module's own string encoder without its general path."""
    return f"[{encode_basestring_ascii(key[0])}, {encode_basestring_ascii(key[1])}]".encode()


_DECODE = json.JSONDecoder().raw_decode


def _json(value: bytes) -> Any:
    """A changelog value's JSON, without json.loads's encoding detection and whitespace
    scan (the task writes UTF-8 and no padding). Raises ValueError for text that is not
    one JSON document."""
    text = value.decode()
    found, end = _DECODE(text)
    if end != len(text):
        raise ValueError(f"not one JSON document: {text[:80]!r}")
    return found


def missing_output(order: Mapping[str, Any], entity: str, features: Sequence[WindowedFeature]
                   ) -> WindowOutput:
    """The output of an order whose ``entity`` is empty: it counts for nobody, and its values
    are the missing ones (0, None for seconds_since_last), whatever the marks."""
    return WindowOutput(order["order_id"], int(order["timestamp_ms"]), entity, "", 1,
                        {f.name: None if f.missing is None else float(f.missing)
                         for f in features})
