"""Replay orders.csv onto the orders topic, as fast as possible or paced."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from triage.bus.settings import Settings, SettingsError
from triage.model.orders import SkippedRow, read_orders_csv
from triage.producer.publisher import OrderPublisher


@dataclass(frozen=True)
class ReplaySummary:
    sent: int
    failed: int
    elapsed_s: float
    end_offsets: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    skipped: tuple[SkippedRow, ...] = ()  # rows that could not become an order record
    # With replay(..., track=True): (partition, offset) of each published row, in file order.
    positions: list[tuple[int, int] | None] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        text = (f"sent {self.sent}, failed {self.failed}, elapsed {self.elapsed_s:.1f} s, "
                f"rate {self.rate:,.0f} orders/s")
        for reason, count in self.errors.items():
            text += f"\n  {count} failed: {reason}"
        if self.skipped:
            text += f"\n  {len(self.skipped)} row(s) of the file skipped, not orders: " + \
                "; ".join(map(str, self.skipped[:5])) + ("; ..." if len(self.skipped) > 5 else "")
        return text


def replay(settings: Settings, csv_path: str | Path, *, rate: float | None = None,
           speedup: float | None = None, limit: int | None = None,
           progress: bool = True, track: bool = False) -> ReplaySummary:
    """Publish each row of ``csv_path`` as an order.

    ``rate`` paces to that many orders per second; ``speedup`` paces by the orders' own
    timestamps (3600: an hour of orders per second). Neither: as fast as the broker takes them.
    Rows that cannot become an order (a timestamp that does not parse) are skipped and listed
    in the summary; ``track`` keeps where each published row landed (``positions``).
    """
    if rate is not None and speedup is not None:
        raise SettingsError("give --rate or --speedup, not both")
    if (rate is not None and rate <= 0) or (speedup is not None and speedup <= 0):
        raise SettingsError("--rate and --speedup must be positive")
    orders = read_orders_csv(csv_path, limit=limit, encoding=settings.csv_encoding)
    publisher = OrderPublisher(settings.connection, settings.topics.orders_topic)
    records = orders.records()
    if speedup is not None:
        due = (orders.timestamp_ms - orders.timestamp_ms.min()) / 1000.0 / speedup
    elif rate is not None:
        due = [i / rate for i in range(len(records))]
    else:
        due = None

    started = time.monotonic()
    with tqdm(total=len(records), unit="order", disable=not progress, smoothing=0.1) as bar:
        for i, record in enumerate(records):
            if due is not None:
                # Pacing: serve delivery reports while waiting for this order's turn.
                while (wait := started + due[i] - time.monotonic()) > 0:
                    publisher.producer.poll(wait)
            publisher.publish(record, position=i if track else None)
            bar.update(1)
        publisher.flush()
    positions = [publisher.delivered.get(i) for i in range(len(records))] if track else []
    return ReplaySummary(publisher.sent, publisher.failed, time.monotonic() - started,
                         dict(publisher.end_offsets), dict(publisher.errors), orders.skipped,
                         positions)
