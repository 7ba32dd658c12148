"""Replay orders.csv onto the orders topic, or a whole data directory onto every stream.

``triage replay orders.csv`` publishes each row as an order. ``triage replay DIR`` publishes
orders.csv and each reference stream's CSV of DIR (model/streams.py: inventory.csv,
payments.csv, zip_codes.csv) as one stream merged in event-time order, each row to its own
topic: what the store's services would have published as it happened. At one instant the merge
is stable: the reference streams in their declared order (stock levels, payments, zip
roll-outs), then orders, each file in its own order (so of two reference rows of one key at one
second the later in the file is applied last and wins, as merge_asof has it). ``streams`` picks
a subset (``orders`` first, and the reference streams a moment later, for example).

A single stream (an orders file) is published in its file's order. Paced with ``rate`` (records
per second, all streams together) or ``speedup`` (by the event times across all streams: 3600
replays an hour of history per second); else as fast as the broker takes them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from triage.bus.clients import make_producer
from triage.bus.interrupt import Interrupt
from triage.bus.settings import SettingsError
from triage.model.orders import SkippedRow, read_orders_csv
from triage.model.reference import parse_timestamps, read_csv
from triage.model.streams import REFERENCE_STREAMS, ReferenceStream, by_name
from triage.producer.publisher import RecordPublisher, stream_publisher
from triage.producer.settings import ProducerSettings

# Stream names, in the order the merge takes them at one instant.
# Reference streams before the orders: of an event and an order at the same time, the event
# is published first (it applies to the order).
STREAMS = (*(s.name for s in REFERENCE_STREAMS), "orders")


@dataclass(frozen=True)
class ReplaySummary:
    """What a replay did. ``sent``/``failed``: records the broker acknowledged / refused (or
    that were still undelivered at the flush timeout); ``handed``: records handed to the
    producer, from record ``skip`` on in the merged stream's order; ``interrupted``: the
    signal that stopped it early (SIGINT, SIGTERM), else None; ``next_skip``: the ``--skip``
    that resumes after the last record handed over."""

    sent: int
    failed: int
    elapsed_s: float
    end_offsets: dict[int, int] = field(default_factory=dict)  # of the orders topic
    errors: dict[str, int] = field(default_factory=dict)
    skipped: tuple[SkippedRow, ...] = ()  # rows of orders.csv that could not become orders
    # With replay(..., track=True): (partition, offset) of each order published, in file order.
    positions: list[tuple[int, int] | None] = field(default_factory=list)
    by_stream: dict[str, int] = field(default_factory=dict)  # records sent per stream
    handed: int = 0
    skip: int = 0
    interrupted: str | None = None
    records: int = 0  # in the merged stream, before skip and limit

    @property
    def next_skip(self) -> int:
        return self.skip + self.handed

    @property
    def refused_all(self) -> bool:
        """Every row was refused: the file had rows, and none became a record to publish."""
        return bool(self.skipped) and self.records == 0

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        text = (f"sent {self.sent}, failed {self.failed}, elapsed {self.elapsed_s:.1f} s, "
                f"rate {self.rate:,.0f} records/s")
        if len(self.by_stream) > 1:
            text += " (" + ", ".join(f"{name} {n}" for name, n in self.by_stream.items()) + ")"
        for reason, count in self.errors.items():
            text += f"\n  {count} failed: {reason}"
        if self.skipped:
            text += f"\n  {len(self.skipped)} row(s) of the file skipped, not orders: " + \
                "; ".join(map(str, self.skipped[:5])) + ("; ..." if len(self.skipped) > 5 else "")
        if self.interrupted:
            text += (f"\n  interrupted ({self.interrupted}) after handing {self.handed:,} "
                     f"record(s) to the producer, from record {self.skip:,} of the merged "
                     f"stream on; the next to send is record {self.next_skip:,}")
        return text


@dataclass
class _Stream:
    name: str
    publisher: RecordPublisher
    records: list[dict[str, Any]]
    times_ms: np.ndarray  # int64 event time of each record


def _reference_records(settings: ProducerSettings, directory: Path, stream: ReferenceStream
                       ) -> tuple[list[dict[str, Any]], np.ndarray]:
    """One reference CSV of ``directory`` as the stream's Avro records and their event times."""
    file = directory / stream.csv_file
    frame = read_csv(file, stream.csv_columns, settings.data.csv_encoding)
    return reference_records(frame, stream, str(file))


def reference_records(frame: Any, stream: ReferenceStream, file: str
                      ) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Rows of a reference stream (model/streams.py), as text in the columns of its CSV, ->
    the stream's Avro records and their event times (int64 UTC ms). The validation of
    ``triage replay`` and ``triage produce`` alike. Raises ReferenceDataError naming ``file``
    and the line (row + 2) of the first time not in ``YYYY-MM-DD HH:MM:SS`` form,
    SettingsError for a number that is not one."""
    times = parse_timestamps(frame[stream.csv_time], f"{file} {stream.csv_time}") * 1000
    columns = {stream.key: frame[stream.key].tolist(), stream.time: times.tolist()}
    if stream.value is not None and stream.kind == "number":
        try:
            columns[stream.value] = frame[stream.value].to_numpy(dtype=np.float64).tolist()
        except ValueError as exc:
            raise SettingsError(f"{file}: non-numeric {stream.value} ({exc})") from None
    elif stream.value is not None:
        columns[stream.value] = frame[stream.value].tolist()
    names = list(columns)
    return [dict(zip(names, row, strict=True))
            for row in zip(*columns.values(), strict=True)], times


def replay(settings: ProducerSettings, path: str | Path, *, streams: Sequence[str] | None = None,
           rate: float | None = None, speedup: float | None = None, limit: int | None = None,
           skip: int = 0, progress: bool = True, track: bool = False,
           stop: Interrupt | None = None) -> ReplaySummary:
    """Publish ``path``: an orders CSV, or a directory of the four CSVs (module docstring).

    ``streams``: which of ``orders, payments, inventory, zip_codes`` a directory replays (all by
    default). ``skip``: leave out the first N records of the merged stream (to resume an
    interrupted replay: its summary's ``next_skip``); ``limit``: then publish at most N. ``stop``
    (an :class:`~triage.bus.interrupt.Interrupt`): once requested, no further record is handed
    over; what was is flushed and the summary says where to resume. Rows of orders.csv that
    cannot become an order are skipped and listed; ``track`` keeps where each published order
    landed (``positions``). ``progress``: a progress bar on stderr, only when it is a terminal
    (where stderr is a log, every line of it stays a log line). Raises SettingsError for
    contradictory options, ReferenceDataError for a file that cannot be read.
    """
    if rate is not None and speedup is not None:
        raise SettingsError("give --rate or --speedup, not both")
    if (rate is not None and rate <= 0) or (speedup is not None and speedup <= 0):
        raise SettingsError("--rate and --speedup must be positive")
    if skip < 0 or (limit is not None and limit < 0):
        raise SettingsError("--skip and --limit take a number >= 0")
    path = Path(path)
    chosen = list(streams) if streams else (list(STREAMS) if path.is_dir() else ["orders"])
    unknown = set(chosen) - set(STREAMS)
    if unknown:
        raise SettingsError(f"--streams takes {', '.join(STREAMS)}; not {', '.join(unknown)}")
    if not path.is_dir() and chosen != ["orders"]:
        raise SettingsError(f"{path} is a file: it replays as orders; give a directory of the "
                            "four CSVs to replay reference streams")
    connection, topics = settings.connection, settings.topics
    producer = make_producer(connection)
    orders_file = path / "orders.csv" if path.is_dir() else path
    loaded: list[_Stream] = []
    skipped: tuple[SkippedRow, ...] = ()
    for name in STREAMS:
        if name not in chosen:
            continue
        if name == "orders":
            orders = read_orders_csv(orders_file, encoding=settings.data.csv_encoding)
            skipped = orders.skipped
            loaded.append(_Stream(name, stream_publisher(name, connection, topics, producer),
                                  orders.records(), orders.timestamp_ms))
            continue
        records, times = _reference_records(settings, path, by_name()[name])
        loaded.append(_Stream(name, stream_publisher(name, connection, topics, producer),
                              records, times))
    return _publish(loaded, producer, rate=rate, speedup=speedup, limit=limit, skip=skip,
                    progress=progress, track=track, skipped=skipped, stop=stop)


def _publish(loaded: list[_Stream], producer: Any, *, rate: float | None,
             speedup: float | None, limit: int | None, skip: int, progress: bool,
             track: bool, skipped: tuple[SkippedRow, ...], stop: Interrupt | None
             ) -> ReplaySummary:
    """Publish the streams merged by (event time, stream order, row), paced as asked."""
    times = np.concatenate([s.times_ms for s in loaded]) if loaded else np.empty(0, np.int64)
    which = np.concatenate([np.full(len(s.records), i) for i, s in enumerate(loaded)]) \
        if loaded else np.empty(0, np.int64)
    row = np.concatenate([np.arange(len(s.records)) for s in loaded]) \
        if loaded else np.empty(0, np.int64)
    # One stream keeps its file's order; several merge by event time.
    order = (np.lexsort((row, which, times)) if len(loaded) > 1 else np.argsort(row))
    records = len(order)
    order = order[skip:skip + limit if limit is not None else None]
    if speedup is not None and len(order):
        due = ((times[order] - times[order].min()) / 1000.0 / speedup).tolist()
    elif rate is not None:
        due = [i / rate for i in range(len(order))]
    else:
        due = None
    orders = next((s for s in loaded if s.name == "orders"), None)
    unit = "order" if len(loaded) == 1 and orders is not None else "record"
    started = time.monotonic()
    handed = 0
    stopped = stop.event if stop is not None else None
    # disable=None: tqdm draws only on a terminal.
    with tqdm(total=len(order), unit=unit, disable=None if progress else True,
              smoothing=0.1) as bar:
        for n, (i, r) in enumerate(zip(which[order].tolist(), row[order].tolist(),
                                       strict=True)):
            if due is not None:
                # Pacing: serve delivery reports while waiting for this record's turn.
                while (wait := started + due[n] - time.monotonic()) > 0 and not (
                        stopped is not None and stopped.is_set()):
                    producer.poll(min(wait, 0.2))
            if stopped is not None and stopped.is_set():
                break
            stream = loaded[i]
            stream.publisher.publish(stream.records[r],
                                     position=r if track and stream is orders else None)
            handed += 1
            bar.update(1)
        remaining = producer.flush(60.0)
    publishers = [s.publisher for s in loaded]
    errors: Counter[str] = Counter()
    for publisher in publishers:
        errors.update(publisher.errors)
    if remaining:
        errors["not delivered before the flush timeout"] += remaining
    positions = [orders.publisher.delivered.get(r) for r in range(len(orders.records))] \
        if track and orders is not None else []
    return ReplaySummary(
        sum(p.sent for p in publishers), sum(p.failed for p in publishers) + remaining,
        time.monotonic() - started, dict(orders.publisher.end_offsets) if orders else {},
        dict(errors), skipped, positions,
        {s.name: p.sent for s, p in zip(loaded, publishers, strict=True)}, handed, skip,
        stop.signal_name if stop is not None and stop.requested and handed < len(order)
        else None, records)
