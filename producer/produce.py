"""``triage produce``: publish events by hand, one from flags or many from JSON lines.

Any of the four streams: an order, a payment status, a stock level, a zip code roll-out. A
row has the columns of the stream's CSV (``order_id, customer_id, sku_code, zip_code,
timestamp``; ``order_id, timestamp, payment_status``; ``sku_code, timestamp, inventory``;
``zip_code, available_from``), times as ``YYYY-MM-DD HH:MM:SS`` UTC, and goes through the same
validation (model/orders.py ``orders_of_frame``, producer/replay.py ``reference_records``),
publisher and partitioner as ``triage replay``: a payment lands on its order's partition.

Unlike a CSV row, every field must be given (an empty id is refused here rather than
dead-lettered by the scorer), and every field but a stock level must be text: a JSON number
would lose a zip code's leading zeros.

A JSON line may name its stream (``"stream": "payment"``) to mix streams in one input; the
others are of the command's stream. A line that is not a JSON object of the stream's columns,
or whose values do not validate, is refused with its line number and the reason; the rest are
published, in input order. Lines are published as they are read, so ``tail -f`` works.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from triage.bus.clients import make_producer
from triage.bus.errors import ConfigurationError
from triage.bus.interrupt import Interrupt
from triage.model.orders import ORDER_COLUMNS, orders_of_frame
from triage.model.streams import REFERENCE_STREAMS, by_name
from triage.producer.publisher import RecordPublisher, stream_publisher
from triage.producer.replay import reference_records
from triage.producer.settings import ProducerSettings

# The command's stream names -> (the replay's stream name, the CSV columns of a row).
# A reference stream's command name is its schema's (payment, inventory, zip_code).
STREAMS: dict[str, tuple[str, list[str]]] = {
    "order": ("orders", ORDER_COLUMNS),
    **{s.schema: (s.name, s.csv_columns) for s in REFERENCE_STREAMS},
}
# The time columns, which take ISO 8601 too.
_TIME_COLUMNS = {"timestamp", *(s.csv_time for s in REFERENCE_STREAMS)}
# Columns that hold numbers (any other must be text: a JSON number would lose leading zeros).
_NUMBER_COLUMNS = {s.value for s in REFERENCE_STREAMS if s.kind == "number"}
_ALIASES = {**{name: name for name in STREAMS},
            **{replay_name: name for name, (replay_name, _) in STREAMS.items()}}


class RefusedEvent(ConfigurationError):
    """An event given to ``triage produce`` that cannot be published; the message says why."""


def now_text() -> str:
    """The current UTC time as ``YYYY-MM-DD HH:MM:SS``: the default time of an event."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


def csv_time(text: str) -> str:
    """A time as the CSVs write it, ``YYYY-MM-DD HH:MM:SS`` UTC: such a text as it is, an ISO
    8601 one (``2021-07-04T20:31:02Z``, an offset converted to UTC, a fraction of a second
    dropped) rewritten; anything else as it is, for the validation to refuse."""
    try:
        datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
        return text
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is not None:
            moment = moment.astimezone(UTC)
    except (ValueError, OverflowError):  # not a time, or one no calendar holds in UTC
        return text
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def stream_of(name: str) -> str:
    """``order``, ``payment``, ``inventory`` or ``zip_code`` (the topics' plural names too).
    Raises RefusedEvent for another."""
    try:
        return _ALIASES[name]
    except KeyError:
        raise RefusedEvent(f"unknown stream {name!r}: one of {', '.join(STREAMS)}") from None


def event_record(stream: str, row: dict[str, Any], where: str,
                 names: dict[str, str] | None = None) -> dict[str, Any]:
    """One row of ``stream`` (its CSV's columns, as text or numbers) -> its Avro record, after
    the replay's validation. ``where`` names the row in messages (``line 3``), ``names`` the
    fields as the caller's user knows them (a column -> a flag). Raises RefusedEvent saying
    why a row cannot be published."""
    replay_name, columns = STREAMS[stream]
    shown = (names or {}).get
    missing = [shown(c, c) for c in columns if row.get(c) in (None, "")]
    if missing:
        raise RefusedEvent(f"{where}: {stream} needs {', '.join(missing)}")
    unknown = sorted(shown(c, c) for c in set(row) - set(columns) - {"stream"})
    if unknown:
        raise RefusedEvent(f"{where}: {stream} takes no {', '.join(unknown)} (it takes "
                           f"{', '.join(shown(c, c) for c in columns)})")
    texts = [shown(c, c) for c in columns
             if c not in _NUMBER_COLUMNS and not isinstance(row[c], str)]
    if texts:  # a JSON number would lose a zip code's or an id's leading zeros
        raise RefusedEvent(f"{where}: {', '.join(texts)} must be text (in quotes)")
    row = {**row, **{c: csv_time(row[c]) for c in _TIME_COLUMNS
                     if c in columns}}  # ISO 8601 too, as the HTTP API takes it
    frame = pd.DataFrame([{c: str(row[c]) for c in columns}])
    if stream == "order":
        orders = orders_of_frame(frame)
        if orders.skipped:
            raise RefusedEvent(f"{where}: timestamp {row['timestamp']!r} is not "
                               "YYYY-MM-DD HH:MM:SS")
        return orders.records()[0]
    try:
        records, _ = reference_records(frame, by_name()[replay_name], where)
    except ConfigurationError as exc:
        raise RefusedEvent(str(exc).replace(" on line 2", "")) from None
    return records[0]


def json_rows(lines: Iterable[str], stream: str
              ) -> Iterator[tuple[int, str, dict[str, Any] | RefusedEvent]]:
    """(line number, stream, row or the reason it is refused) of each non-blank JSON line."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, stream, RefusedEvent(f"line {number}: not JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            yield number, stream, RefusedEvent(f"line {number}: not a JSON object")
            continue
        try:
            yield number, stream_of(str(row.get("stream", stream))), row
        except RefusedEvent as exc:
            yield number, stream, RefusedEvent(f"line {number}: {exc}")


def _record_or_refusal(stream: str, row: dict[str, Any], number: int
                       ) -> dict[str, Any] | RefusedEvent:
    try:
        return event_record(stream, row, f"line {number}")
    except RefusedEvent as exc:
        return exc


@dataclass
class ProduceSummary:
    """What ``triage produce`` did: events acknowledged (``sent``) or not (``failed``, with
    ``errors``), ``refused`` (reasons, with line numbers), ``delivered``: (stream, key,
    topic, partition, offset) of each acknowledged event in input order, ``interrupted``: the
    signal that stopped it, else None."""

    sent: int = 0
    failed: int = 0
    refused: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    delivered: list[tuple[str, str, str, int, int]] = field(default_factory=list)
    interrupted: str | None = None

    def __str__(self) -> str:
        text = f"published {self.sent}, failed {self.failed}, refused {len(self.refused)}"
        for reason, count in self.errors.items():
            text += f"\n  {count} failed: {reason}"
        for reason in self.refused[:20]:
            text += f"\n  refused: {reason}"
        if len(self.refused) > 20:
            text += f"\n  ... and {len(self.refused) - 20} more refused"
        if self.interrupted:
            text += f"\n  interrupted ({self.interrupted}): lines after it were not read"
        return text


def produce_events(settings: ProducerSettings, rows: Iterable[tuple[int, str, dict[str, Any]
                                                             | RefusedEvent]],
                   *, idempotent: bool = True) -> ProduceSummary:
    """Publish ``rows`` ((line, stream, row or refusal), as :func:`json_rows` yields) in input
    order, with the replay's publishers on one producer. Ctrl-C (SIGINT) or SIGTERM while
    publishing stops after that event; while waiting for the next line it stops there: what
    was handed over is flushed either way. ``idempotent``: False for a single event, which
    would otherwise wait half a second for a producer id (a retry's duplicate is scored to the
    identical prediction)."""
    producer = make_producer(settings.connection, **({} if idempotent else
                                                      {"enable.idempotence": False}))
    publishers: dict[str, RecordPublisher] = {}
    summary = ProduceSummary()
    order: list[tuple[str, int, str]] = []  # (stream, position, key) of each handed over
    with Interrupt() as stop:
        try:
            stop.raising = True  # waiting for the next line: a signal ends the wait
            for number, stream, row in rows:
                stop.raising = False
                if isinstance(row, RefusedEvent):
                    summary.refused.append(str(row))
                elif not isinstance(record := _record_or_refusal(stream, row, number), dict):
                    summary.refused.append(str(record))
                else:
                    if stream not in publishers:
                        publishers[stream] = stream_publisher(
                            STREAMS[stream][0], settings.connection, settings.topics, producer)
                    publisher = publishers[stream]
                    publisher.publish(record, position=len(order))
                    order.append((stream, len(order), str(record[publisher.key_field])))
                if stop.requested:
                    break
                stop.raising = True
        except KeyboardInterrupt:
            pass
        stop.raising = False
        summary.interrupted = stop.signal_name if stop.requested else None
        remaining = producer.flush(30.0)  # a second signal cuts it short
    for publisher in publishers.values():
        summary.sent += publisher.sent
        summary.failed += publisher.failed
        for reason, count in publisher.errors.items():
            summary.errors[reason] = summary.errors.get(reason, 0) + count
    if remaining:
        summary.failed += remaining
        summary.errors["not delivered before the flush timeout"] = remaining
    for stream, position, key in order:
        publisher = publishers[stream]
        if position in publisher.delivered:
            partition, offset = publisher.delivered[position]
            summary.delivered.append((stream, key, publisher.topic, partition, offset))
    return summary
