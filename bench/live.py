"""The live-path figures of ``triage bench``: the reference events it publishes on topics of its
own, and what it reads back from a worker's JSON log (docs/benchmarks.md, "Live reference
data").

On the live path the scorer runs as shipped, without ``--reference``: an order waits until
every reference partition it reads has passed its second (scoring/feed.py). The bench
gives each order one payment event (its ``order_id``) and one stock event (its ``sku_code``)
carrying the status and level the CSV history gives as of the order, so the features stay
those of the data: pre-published at the order's own time for the throughput and restore runs,
published just before the order and stamped with the time of publishing (as the order itself)
for the latency run. Zip codes are all of ``zip_codes.csv``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

from triage.bus.settings import ConnectionSettings
from triage.model.orders import OrderColumns
from triage.model.reference import (
    MISSING_STATUS,
    REFERENCE_FILES,
    ReferenceTables,
    parse_timestamps,
    read_csv,
)
from triage.model.streams import INVENTORY, PAYMENTS, ZIP_CODES
from triage.producer.publisher import RecordPublisher, reference_publisher

# What an order's live events carry when the CSV history has nothing as of the order: the same
# label as nothing (the policy treats a missing status as not OK, a missing level as no stock).
_NO_STATUS, _NO_STOCK = "PENDING", 0.0
_ANNOUNCE_AHEAD_MS = 365 * 86_400_000  # how far ahead the latency run's zip announcement is


@dataclass(frozen=True)
class LiveTopics:
    """The reference topics one live-path worker reads."""

    inventory: str
    payments: str
    zip_codes: str

    def settings(self) -> dict[str, str]:
        """The topic names as :meth:`Settings.replace` takes them."""
        return {f"{INVENTORY.name}_topic": self.inventory,
                f"{PAYMENTS.name}_topic": self.payments,
                f"{ZIP_CODES.name}_topic": self.zip_codes}


@dataclass
class ReferencePublishers:
    """Publishers of the three reference streams, sharing one producer."""

    zip_codes: RecordPublisher
    payments: RecordPublisher
    stock: RecordPublisher

    @classmethod
    def make(cls, connection: ConnectionSettings, topics: LiveTopics, producer: Producer
             ) -> ReferencePublishers:
        return cls(reference_publisher(ZIP_CODES, connection, topics.zip_codes, producer),
                   reference_publisher(PAYMENTS, connection, topics.payments, producer),
                   reference_publisher(INVENTORY, connection, topics.inventory, producer))

    def all(self) -> list[RecordPublisher]:
        return [self.zip_codes, self.payments, self.stock]


def as_of_values(records: Sequence[dict[str, Any]], data_dir: Path, encoding: str = "utf-8"
                 ) -> dict[str, tuple[str, float]]:
    """``order_id`` -> (payment status, stock level) of each order as of its time in the CSV
    history of ``data_dir``: what its live events carry (module docstring)."""
    features = OrderColumns.from_records(records).features(
        ReferenceTables.load(data_dir, encoding=encoding))
    statuses = [_NO_STATUS if s == MISSING_STATUS else str(s)
                for s in features.payment_status.tolist()]
    levels = [_NO_STOCK if math.isnan(v) else v for v in features.inventory.tolist()]
    return {r["order_id"]: (s, v) for r, s, v in zip(records, statuses, levels, strict=True)}


def zip_code_records(data_dir: Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Every row of ``data_dir``'s zip_codes.csv as a zip code stream record."""
    file = "zip_codes.csv"
    frame = read_csv(data_dir / file, REFERENCE_FILES[file], encoding)
    times = parse_timestamps(frame["available_from"], f"{file} available_from") * 1000
    return [{"zip_code": z, "available_from_ms": t}
            for z, t in zip(frame["zip_code"].tolist(), times.tolist(), strict=True)]


def announce_ahead(known: Iterable[str], now_ms: int) -> dict[str, Any]:
    """A roll-out announced a year ahead, of a zip code no order and no row of the data names,
    without changing any order's features. It moves the zip code stream only to the clock plus
    TRIAGE_MAX_CLOCK_SKEW_MS (scoring/feed.py): after that the stream is quiet, and
    each order waits the lateness allowance for it, as it would for a store's rare roll-outs."""
    taken = set(known)
    code = next(f"{n:05d}" for n in range(99_999, -1, -1) if f"{n:05d}" not in taken)
    return {"zip_code": code, "available_from_ms": now_ms + _ANNOUNCE_AHEAD_MS}


def publish_order_events(publishers: ReferencePublishers, records: Sequence[dict[str, Any]],
                         values: dict[str, tuple[str, float]]) -> None:
    """One payment and one stock event per order, at the order's own time (UTC ms), in order:
    an event at an order's second applies to it."""
    for record in records:
        status, level = values[record["order_id"]]
        publishers.payments.publish({"order_id": record["order_id"],
                                     "timestamp_ms": record["timestamp_ms"],
                                     "payment_status": status})
        publishers.stock.publish({"sku_code": record["sku_code"],
                                  "timestamp_ms": record["timestamp_ms"], "inventory": level})


def stock_cycle(skus: Sequence[str], n: int, start_ms: int, end_ms: int
                ) -> Iterator[dict[str, Any]]:
    """``n`` stock events going round ``skus``, evenly spaced in time from ``start_ms`` to
    ``end_ms`` (UTC ms), with levels of a fixed sawtooth from -10 to 99 (a tenth at or below
    zero): the restore run's million records."""
    step = (end_ms - start_ms) / max(n - 1, 1)
    for k in range(n):
        yield {"sku_code": skus[k % len(skus)], "timestamp_ms": start_ms + int(k * step),
               "inventory": float(k * 7 % 110 - 10)}


class LiveEvents:
    """For the latency run: before each order, publish its payment and stock events, then
    give the order back; all three are stamped with the time of publishing (UTC ms), so the
    streams keep up with the orders. An event applies from its own millisecond on: an order
    sees its own events, and the next order's events move their partitions past its time."""

    def __init__(self, publishers: ReferencePublishers,
                 values: dict[str, tuple[str, float]]) -> None:
        self.publishers = publishers
        self.values = values

    def stamp(self, order: dict[str, Any]) -> dict[str, Any]:
        """Publish ``order``'s two events now; returns the order stamped now."""
        now = int(time.time() * 1000)
        status, level = self.values.get(order["order_id"], (_NO_STATUS, _NO_STOCK))
        self.publishers.payments.publish({"order_id": order["order_id"], "timestamp_ms": now,
                                          "payment_status": status})
        self.publishers.stock.publish({"sku_code": order["sku_code"], "timestamp_ms": now,
                                       "inventory": level})
        return {**order, "timestamp_ms": now}


def log_events(path: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The first line of each event of ``names`` in a worker's JSON log, with its time as
    ``at`` (UTC seconds since the epoch, from the line's ISO timestamp)."""
    wanted, found = set(names), {}
    with open(path, errors="replace") as f:
        for line in f:
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            name = event.get("event")
            if name in wanted and name not in found:
                event["at"] = datetime.fromisoformat(event["timestamp"]).timestamp()
                found[name] = event
    return found


def order_span_ms(records: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """The first and last order time (UTC ms) of ``records``."""
    times = np.fromiter((r["timestamp_ms"] for r in records), np.int64, len(records))
    return int(times.min()), int(times.max())
