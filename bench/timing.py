"""A store's producer timing, simulated: the four streams published with independent delays,
bursts after pauses, out-of-order events and producer clocks ahead, through the workers'
broker-free event-time rule, scoring core and corrections (scoring/feed.py,
scoring/core.py, scoring/corrections.py) on a simulated wall clock.

Used twice: by the property test (tests/test_live_timing.py: every order's last revision
equals merge_asof over all events, and every first prediction that differs is flagged or
corrected) and by ``triage bench --timing`` (corrections and flags per 10,000 orders under
this timing, docs/benchmarks.md).

The history (:func:`store_history`): orders every 0-400 ms over a few SKUs and zips; each
order's payment authorised up to 2 s before it, some with a later status change; stock levels
per SKU and zip roll-outs at random times. Each record is published (:func:`publish`) at its
event time plus a delay drawn for it, uniform up to ``Timing.max_delay_ms``; a stream's
producer also pauses now and then (the records of the pause go out together at its end, a
burst) and may stamp its records ahead of the wall clock by up to ``Timing.skew_ms``. Within a
partition the records keep their publication order, so event times run out of order there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from triage.bus.clients import Source
from triage.bus.partitioner import partitions_for
from triage.model import streams
from triage.model.artifact import Model
from triage.model.reference import ReferenceTables
from triage.schemas.codec import Codec
from triage.scoring.core import CoreConfig, Incoming, ScoringCore
from triage.scoring.corrections import RetainedOrders
from triage.scoring.feed import ReferenceFeed
from triage.scoring.settings import ReferenceSettings, ValidationSettings
from triage.scoring.validation import OrderValidator

ORDERS = "orders"
INVENTORY, PAYMENTS, ZIP_CODES = (s.name for s in (streams.INVENTORY, streams.PAYMENTS,
                                                    streams.ZIP_CODES))
_KEYS = {ORDERS: "order_id", **{s.name: s.key for s in streams.REFERENCE_STREAMS}}
START_MS = 1_767_607_200_000  # 2026-01-05 10:00:00 UTC
PARTITIONS = {ORDERS: 2, PAYMENTS: 2, INVENTORY: 2, ZIP_CODES: 1}
_STATUSES = ("OK", "OK", "OK", "PENDING", "DECLINED")


@dataclass(frozen=True)
class Timing:
    """How the store's producers publish. ``max_delay_ms``: each record at its event time plus
    a uniform delay up to this; ``pauses``: pauses per reference stream, each up to
    ``pause_ms`` (its records go out together at its end); ``skew_ms``: how far ahead of the
    wall clock a reference producer's clock may run (each stream draws its own offset);
    ``foreign_payments``: the payment service places its records at random, not by murmur2."""

    max_delay_ms: int = 3_000
    pauses: int = 1
    pause_ms: int = 4_000
    skew_ms: int = 0
    foreign_payments: bool = False


@dataclass(frozen=True)
class Event:
    """A record of one of the four streams: its event time (as stamped) and when it is
    published (wall clock, UTC ms)."""

    stream: str
    record: dict[str, Any]
    time_ms: int
    published_ms: int = 0
    partition: int = 0


def store_history(rng: np.random.Generator, orders: int, start_ms: int = START_MS,
                  max_gap_ms: int = 400) -> list[Event]:
    """``orders`` orders from ``start_ms`` (UTC ms), 0 to ``max_gap_ms`` apart, and their
    reference events (module docstring), unpublished."""
    skus = [f"SKU-{i}" for i in range(4)]
    zips = [f"{i:05d}" for i in range(3)]
    times = start_ms + np.cumsum(rng.integers(0, max_gap_ms, orders))
    span = int(times[-1] - start_ms) + 4_000
    events: list[Event] = []
    for sku in skus:
        for at in np.sort(rng.integers(start_ms - 5_000, start_ms + span, 1 + span // 3_000)):
            events.append(Event(INVENTORY, {"sku_code": sku, "timestamp_ms": int(at),
                                            "inventory": float(rng.integers(-2, 6))}, int(at)))
    for code in zips:
        for at in rng.integers(start_ms - 60_000, start_ms + span, 2):
            events.append(Event(ZIP_CODES, {"zip_code": code, "available_from_ms": int(at)},
                                int(at)))
    for i, at in enumerate(times.tolist()):
        order_id = f"O-{i:05d}"
        events.append(Event(ORDERS, {"order_id": order_id, "customer_id": f"C-{i % 7}",
                                     "timestamp_ms": at, "sku_code": skus[int(rng.integers(4))],
                                     "zip_code": zips[int(rng.integers(3))]}, at))
        authorised = at - int(rng.integers(0, 2_000))
        statuses = [authorised] if rng.random() < 0.9 else []
        if rng.random() < 0.3:
            statuses.append(at + int(rng.integers(-500, 3_000)))
        for when in statuses:
            events.append(Event(PAYMENTS, {"order_id": order_id, "timestamp_ms": when,
                                           "payment_status": str(rng.choice(_STATUSES))}, when))
    return events


def publish(rng: np.random.Generator, events: Sequence[Event], timing: Timing) -> list[Event]:
    """Each event with its publication time and partition, in publication order."""
    first = min(e.time_ms for e in events if e.stream == ORDERS)
    span = max(e.time_ms for e in events) - first
    pauses = {stream: [(int(p0), int(p0) + int(rng.integers(0, timing.pause_ms + 1)))
                       for p0 in rng.integers(first, first + max(span, 1), timing.pauses)]
              for stream in (PAYMENTS, INVENTORY, ZIP_CODES)}
    skews = {stream: int(rng.integers(0, timing.skew_ms + 1)) for stream in pauses}
    out = []
    for event in events:
        if event.stream == ORDERS:
            published = event.time_ms + int(rng.integers(0, 50))
        else:
            # The producer's clock runs ahead by its skew: the true time is earlier.
            published = event.time_ms - skews[event.stream] + int(
                rng.integers(0, timing.max_delay_ms + 1))
            for start, end in pauses[event.stream]:
                if start <= published < end:
                    published = end
        key = event.record[_KEYS[event.stream]]
        if event.stream == PAYMENTS and timing.foreign_payments:
            partition = int(rng.integers(PARTITIONS[PAYMENTS]))
        else:
            partition = int(partitions_for([key.encode()], PARTITIONS[event.stream])[0])
        out.append(Event(event.stream, event.record, event.time_ms, published, partition))
    order = sorted(range(len(out)), key=lambda i: (out[i].published_ms, i))
    return [out[i] for i in order]


@dataclass
class Simulated:
    """What the simulated workers published: per order, its prediction records in order
    (the first prediction, then any corrected revisions)."""

    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    corrections: int = 0
    flagged: int = 0
    orders: int = 0


def simulate(model: Model, published: Sequence[Event], settings: ReferenceSettings,
             tick_ms: int = 50) -> Simulated:
    """Run the broker-free reader, core and corrections over ``published`` on a simulated
    wall clock advancing by ``tick_ms``: each tick applies the reference records published
    by then (every partition read to its end) and hands the orders published by then to the
    core, until every order is scored and the last record is older than the max wait."""
    now = [min(e.published_ms for e in published)]
    feed = ReferenceFeed(ReferenceTables.empty(), settings,
                         OrderValidator(ValidationSettings()), snapshot=False,
                         clock=lambda: now[0])
    for stream in (PAYMENTS, INVENTORY, ZIP_CODES):
        feed.assign(stream, range(PARTITIONS[stream]), count=PARTITIONS[stream])
    codec = Codec("order")
    core = ScoringCore(model, feed.tables, codec, config=CoreConfig(sample_rate=0.0),
                       gate=feed, retained=RetainedOrders(settings.correction_retention_s * 1000),
                       clock=lambda: now[0], monotonic=lambda: now[0] / 1000.0)
    result = Simulated(orders=sum(e.stream == ORDERS for e in published))
    offsets: dict[tuple[str, int], int] = {}
    end = max(e.published_ms for e in published) + settings.reference_max_wait_ms \
        + settings.reference_lateness_ms + 2 * tick_ms
    position = 0
    while now[0] <= end or core.waiting:
        arrived = []
        while position < len(published) and published[position].published_ms <= now[0]:
            arrived.append(published[position])
            position += 1
        late = []
        by_partition: dict[tuple[str, int], list[Event]] = {}
        for event in arrived:
            by_partition.setdefault((event.stream, event.partition), []).append(event)
        for (stream, partition), events in by_partition.items():
            if stream == ORDERS:
                continue
            first = offsets.get((stream, partition), 0)
            offsets[(stream, partition)] = first + len(events)
            late += feed.apply(stream, partition, [e.record for e in events],
                               list(range(first, first + len(events)))).late
        for (stream, partition), count in offsets.items():
            if stream != ORDERS:
                feed.note_position(stream, partition, 0, count)
        for correction in core.correct(late) + core.verify():
            result.predictions[correction.record["order_id"]].append(correction.record)
            result.corrections += 1
        items = []
        for event in (e for e in arrived if e.stream == ORDERS):
            offset = offsets.get((ORDERS, event.partition), 0)
            offsets[(ORDERS, event.partition)] = offset + 1
            items.append(Incoming(codec.encode(event.record), event.record["order_id"].encode(),
                                  Source(ORDERS, event.partition, offset, event.published_ms)))
        outcome = core.process(items)
        assert not outcome.dead_letters, outcome.dead_letters
        for scored in outcome.predictions:
            result.predictions.setdefault(scored.record["order_id"], []).append(scored.record)
            result.flagged += scored.record["reference_wait_expired"]
        now[0] += tick_ms
    return result


def figures(model: Model, orders: int = 10_000, seed: int = 1,
            allowances_ms: Sequence[int] = (2_000, 200)) -> dict[str, Any]:
    """Corrections and flags per 10,000 orders under the property test's timing (records up
    to 3 s late, a pause of up to 4 s per stream, producer clocks up to 1 s ahead), for each
    lateness allowance in ``allowances_ms``; and first predictions wrong with neither (0)."""
    rng = np.random.default_rng(seed)
    timing = Timing(max_delay_ms=3_000, pauses=1, pause_ms=4_000, skew_ms=1_000)
    published = publish(rng, store_history(rng, orders), timing)
    out: dict[str, Any] = {"orders": orders, "timing": timing.__dict__, "by_allowance_ms": {}}
    for allowance in allowances_ms:
        settings = ReferenceSettings(reference_lateness_ms=allowance,
                                     reference_max_wait_ms=max(5_000, allowance))
        result = simulate(model, published, settings)
        scale = 10_000 / max(result.orders, 1)
        corrected_orders = sum(len(r) > 1 for r in result.predictions.values())
        waits = [r[0]["scored_at_ms"] - r[0]["order_published_at_ms"]
                 for r in result.predictions.values()]
        out["by_allowance_ms"][str(allowance)] = {
            "corrections_per_10000": round(result.corrections * scale, 1),
            "corrected_orders_per_10000": round(corrected_orders * scale, 1),
            "flagged_per_10000": round(result.flagged * scale, 1),
            "first_prediction_wait_ms": {f"p{q}": float(np.percentile(waits, q))
                                         for q in (50, 99)}}
    return out
