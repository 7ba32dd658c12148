"""Corrections: the orders a worker scored recently, what it last published for each, and where
to find the ones a late reference event touches.

A prediction is published with a ``revision`` (prediction.avsc): 1 the first time. When a
reference event arrives after an order it applies to was scored (later than
``TRIAGE_REFERENCE_LATENESS_MS``, or out of order within its partition), the scoring core
(scoring/core.py) computes the order's features again; if they changed, it publishes the
order again with the next revision, the new features and recommendation, and the reason
(``late_reference:<streams>``). Readers keep the highest revision per order, not the latest
offset; ``triage predictions`` and the HTTP door's view do. A store holding orders for a
missing payment can thereby release them when the payment lands.

:class:`RetainedOrders` keeps, for ``TRIAGE_CORRECTION_RETENTION_S`` of wall clock, each
scored order's keys, lineage and last published revision, in columns per scored batch (no
object per order beyond the strings the batch already had), with an index by ``order_id``. A
late event older than every order kept is counted (``triage_reference_beyond_retention_total``).

**Restarts and rebalances.** What was published is on the predictions topic, so a worker that
is assigned an orders partition reads back that partition's predictions of the last retention
period (consumer/readback.py, from the offsets for that time) before it scores any order of
it: the highest revision of each order becomes what it keeps. Those orders are checked against
its own tables once the event-time rule admits them (another worker scored them), and corrected
if their features differ. An order record read again after a crash (its partition and offset
already have a prediction) is published again only if its features changed, as the next
revision: a batch processed again republishes nothing that would contradict what is out, and
revision numbers never mean two things.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import compress
from typing import Any

import numpy as np

from triage.model.features import BY_NAME, FEATURE_NAMES, FeatureBatch
from triage.model.streams import REFERENCE_STREAMS, ReferenceStream, by_name
from triage.scoring import metrics
from triage.scoring.feed import LateEvent


def revision_reason(streams: Iterable[str]) -> str:
    """The ``revision_reason`` of a correction whose features changed because of late events
    of ``streams``."""
    return "late_reference:" + ",".join(sorted(set(streams)))


def changed_streams(old: FeatureBatch, new: FeatureBatch) -> list[list[str]]:
    """Per row, the reference streams whose feature differs between ``old`` and ``new`` (equal
    missing values, NaN or null, are the same); empty where nothing changed."""
    changed: list[list[str]] = [[] for _ in range(len(new))]
    for name in FEATURE_NAMES:
        stream = BY_NAME[name].stream
        a, b = old.columns[name], new.columns[name]
        same = (a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else a == b
        differs = ~same
        for row in np.flatnonzero(differs).tolist():
            changed[row].append(stream or name)
    return changed


@dataclass(eq=False)  # compared by identity: a batch is itself, whatever its contents
class Kept:
    """The orders of one scored batch of one orders partition, in columns, as last published.
    ``verified`` is False for orders read back from the predictions topic and not yet checked
    against this worker's own tables; ``alive`` is False for a row an order's later record
    replaced in the index, and for one that cannot be recomputed (read back from a record of
    an earlier contract, which has no sku_code or zip_code)."""

    partition: int
    order_id: list[str]
    customer_id: list[str]
    sku_code: list[str]
    zip_code: list[str]
    timestamp_ms: np.ndarray    # int64, UTC ms
    offset: np.ndarray          # int64, on the orders topic
    published_ms: np.ndarray    # int64, the order record's Kafka timestamp
    expired: np.ndarray         # bool: reference_wait_expired of the last revision
    revision: np.ndarray        # int32, the last published
    recommendation: np.ndarray  # object: the last published
    features: FeatureBatch      # the last published
    scored_at_ms: int           # wall clock, when the batch was scored or read back
    verified: np.ndarray        # bool
    alive: np.ndarray           # bool
    read_back_at: float = 0.0   # monotonic seconds when read back from the topic
    # per row, the windowed features published as unknown, and why (prediction.avsc's
    # windowed_unknown); None: none was
    windowed_unknown: list[dict[str, str]] | None = None

    def __post_init__(self) -> None:
        self._hashes: dict[str, np.ndarray] = {}
        self.seq = -1  # its number in RetainedOrders, once kept
        self.newest_ms = int(self.timestamp_ms.max()) if len(self.timestamp_ms) else -(2**62)

    def __len__(self) -> int:
        return len(self.order_id)

    def unknown(self, row: int) -> dict[str, str]:
        """The windowed features published as unknown for ``row``, and why."""
        return {} if self.windowed_unknown is None else self.windowed_unknown[row]

    def hashes(self, order_key: str) -> np.ndarray:
        """int64 ``hash()`` of each order's ``order_key`` field (one of the order fields kept
        here: the field a reference stream joins on), cached."""
        found = self._hashes.get(order_key)
        if found is None:
            column: list[str] = getattr(self, order_key)
            found = np.fromiter(map(hash, column), dtype=np.int64, count=len(column))
            self._hashes[order_key] = found
        return found


_ROW_BITS = 24  # an index entry is (batch number << _ROW_BITS) | row


class RetainedOrders:
    """The orders this worker scored in the last ``retention_ms`` of wall clock, by orders
    partition (module docstring). Not thread-safe: the worker loop owns it.

    The index maps each order_id to an int, (batch number << 24) | row: a dict of str and
    int is not tracked by Python's garbage collector, where one of (batch, row) tuples would
    make every full collection walk the hundreds of thousands kept."""

    def __init__(self, retention_ms: int,
                 streams: Sequence[ReferenceStream] = REFERENCE_STREAMS) -> None:
        self.retention_ms = retention_ms
        self.streams = by_name(streams)
        self.batches: dict[int, list[Kept]] = {}
        self.index: dict[str, int] = {}  # order_id -> its latest row (class docstring)
        self.by_number: dict[int, Kept] = {}
        self._next = 0
        self.dropped_upto = -(2**62)  # latest order time (ms) no longer kept
        self.unchecked: list[Kept] = []  # batches with rows not verified yet (read back)

    def __len__(self) -> int:
        return sum(len(k) for batches in self.batches.values() for k in batches)

    def add(self, kept: Kept) -> None:
        """Keep a scored (or read back) batch of fewer than 2**24 orders; its rows become
        their orders' latest."""
        if len(kept) >= 1 << _ROW_BITS:
            raise ValueError(f"a kept batch holds fewer than {1 << _ROW_BITS} orders")
        kept.seq, self._next = self._next, self._next + 1
        self.by_number[kept.seq] = kept
        self.batches.setdefault(kept.partition, []).append(kept)
        if not (kept.verified | ~kept.alive).all():
            self.unchecked.append(kept)
        index = self.index
        again = index.keys() & set(kept.order_id) if index else ()
        for order_id in again:  # orders kept before: their older row is no longer theirs
            before = self.latest(order_id)
            if before is not None:
                before[0].alive[before[1]] = False
        base = kept.seq << _ROW_BITS
        index.update(zip(kept.order_id, range(base, base + len(kept)), strict=True))
        if len(set(kept.order_id)) < len(kept):  # an order twice in a batch: the last counts
            for row, order_id in enumerate(kept.order_id):
                if index[order_id] != base + row:
                    kept.alive[row] = False

    def latest(self, order_id: str) -> tuple[Kept, int] | None:
        """(batch, row) of ``order_id``'s last published revision, if kept."""
        entry = self.index.get(order_id)
        if entry is None:
            return None
        return self.by_number[entry >> _ROW_BITS], entry & ((1 << _ROW_BITS) - 1)

    def expire(self, now_ms: int) -> None:
        """Forget the batches scored (or read back) before ``now_ms - retention_ms``."""
        cutoff = now_ms - self.retention_ms
        for partition, batches in self.batches.items():
            if batches and batches[0].scored_at_ms < cutoff:
                old = [k for k in batches if k.scored_at_ms < cutoff]
                self.batches[partition] = [k for k in batches if k.scored_at_ms >= cutoff]
                for kept in old:
                    self._forget(kept)

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget the orders of revoked partitions (their new owner reads them back)."""
        for partition in partitions:
            for kept in self.batches.pop(partition, []):
                self._forget(kept, counts=False)

    def _forget(self, kept: Kept, counts: bool = True) -> None:
        if self.unchecked:
            self.unchecked = [k for k in self.unchecked if k is not kept]
        index = self.index
        self.by_number.pop(kept.seq, None)
        # The rows still the latest of their order (most): those that did not go on living
        # in a later batch.
        for order_id in compress(kept.order_id, kept.alive.tolist()):
            entry = index.get(order_id)
            if entry is not None and entry >> _ROW_BITS == kept.seq:
                del index[order_id]
        if counts and len(kept):
            self.dropped_upto = max(self.dropped_upto, kept.newest_ms)

    def affected(self, late: Sequence[LateEvent]) -> list[tuple[Kept, np.ndarray]]:
        """(batch, rows) of the kept orders that ``late`` events apply to: an order whose key
        for the event's stream is the event's, at or after the event's time. Events of a stream
        joined on ``order_id`` (payments) are found through the index; the others (stock, zip
        codes: few keys touching many orders) by a scan of the batches newer than the event.
        An event at or before the newest order no longer kept is counted as possibly beyond
        retention."""
        rows: dict[int, tuple[Kept, set[int]]] = {}

        def hit(kept: Kept, row: int) -> None:
            rows.setdefault(id(kept), (kept, set()))[1].add(row)

        by_stream: dict[str, dict[str, int]] = {}
        for event in late:
            if event.time_ms <= self.dropped_upto:
                metrics.REFERENCE_BEYOND_RETENTION.labels(event.stream).inc()
            if self.streams[event.stream].order_key == "order_id":  # one order: the index
                entry = self.latest(event.key)
                if entry is not None and entry[0].alive[entry[1]] \
                        and entry[0].timestamp_ms[entry[1]] >= event.time_ms:
                    hit(*entry)
                    metrics.REFERENCE_LATE.labels(event.stream).inc()
                continue
            earliest = by_stream.setdefault(event.stream, {})
            earliest[event.key] = min(earliest.get(event.key, event.time_ms), event.time_ms)
        for stream, earliest in by_stream.items():
            oldest = min(earliest.values())
            wanted = np.fromiter(map(hash, earliest), dtype=np.int64, count=len(earliest))
            touched: set[str] = set()
            for batches in self.batches.values():
                for kept in batches:
                    if kept.newest_ms < oldest:
                        continue
                    order_key = self.streams[stream].order_key
                    candidates = np.flatnonzero(np.isin(kept.hashes(order_key), wanted)
                                                & (kept.timestamp_ms >= oldest) & kept.alive)
                    keys: list[str] = getattr(kept, order_key)
                    for row in candidates.tolist():
                        since = earliest.get(keys[row])
                        if since is not None and kept.timestamp_ms[row] >= since:
                            hit(kept, row)
                            touched.add(keys[row])
            if touched:
                metrics.REFERENCE_LATE.labels(stream).inc(len(touched))
        return [(kept, np.array(sorted(found))) for kept, found in rows.values()]

    def unverified(self) -> list[tuple[Kept, np.ndarray]]:
        """(batch, rows) of the orders read back from the topic and not checked yet (only
        the batches read back are looked at: this runs on every turn of the loop)."""
        found = []
        for kept in self.unchecked:
            rows = np.flatnonzero(~kept.verified & kept.alive)
            if len(rows):
                found.append((kept, rows))
        self.unchecked = [kept for kept, _ in found]
        return found


def kept_from_records(partition: int, records: Sequence[dict[str, Any]], read_back_at: float,
                      now_ms: int) -> Kept:
    """A :class:`Kept` batch from prediction records read back from the topic (each the
    highest revision of its order) at ``read_back_at`` (monotonic seconds) and ``now_ms``
    (wall clock, UTC ms: kept for a retention period from then), not verified yet. A record
    of an earlier contract has no sku_code or zip_code: its features cannot be computed
    again, so it only numbers the next revision of its order (``alive`` False)."""
    n = len(records)
    whole = np.fromiter((bool(r["sku_code"] and r["zip_code"]) for r in records), bool, n)
    features = FeatureBatch.from_values({name: [r["features"][name] for r in records]
                                         for name in FEATURE_NAMES})
    return Kept(
        partition=partition,
        order_id=[r["order_id"] for r in records],
        customer_id=[r["customer_id"] for r in records],
        sku_code=[r["sku_code"] for r in records],
        zip_code=[r["zip_code"] for r in records],
        timestamp_ms=np.fromiter((r["order_timestamp_ms"] for r in records), np.int64, n),
        offset=np.fromiter((r["order_offset"] for r in records), np.int64, n),
        published_ms=np.fromiter((r["order_published_at_ms"] for r in records), np.int64, n),
        expired=np.fromiter((r["reference_wait_expired"] for r in records), bool, n),
        revision=np.fromiter((r["revision"] for r in records), np.int32, n),
        recommendation=np.array([r["recommendation"] for r in records], dtype=object),
        features=features,
        scored_at_ms=now_ms,
        verified=~whole,
        alive=whole,
        read_back_at=read_back_at,
        windowed_unknown=[dict(r["windowed_unknown"]) for r in records],
    )
