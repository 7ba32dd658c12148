"""Reading a topic of the service from the beginning, decoded: predictions, drift samples.

A reader assigns itself every partition instead of joining a group: it starts at once, never
commits, and never takes partitions from the scorers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message

from triage.bus.clients import make_consumer, partitions_of
from triage.bus.deadletter import HEADER_PREFIX, REASON_HEADER, headers_dict
from triage.bus.errors import WaitTimeout
from triage.bus.offsets import watermarks
from triage.bus.settings import ConnectionSettings, TopicSettings
from triage.schemas.codec import codec_for


class TopicReader:
    """Decodes with ``schema_name``'s codec; with ``schema_name=None`` yields raw messages and
    ``None`` records (the dead-letter tools read bytes that may not decode)."""

    def __init__(self, connection: ConnectionSettings, topic: str, schema_name: str | None
                 ) -> None:
        self.codec = codec_for(connection, schema_name, topic) if schema_name else None
        self.connection, self.topic = connection, topic
        self.consumer = make_consumer(connection, f"triage-reader-{uuid.uuid4().hex}")
        partitions = partitions_of(self.consumer, topic)
        for tp in partitions:
            tp.offset = OFFSET_BEGINNING
        self.consumer.assign(partitions)

    def poll(self, timeout_s: float = 0.5, max_records: int = 1000
             ) -> list[tuple[Message, dict[str, Any] | None]]:
        out = []
        for msg in self.consumer.consume(max_records, timeout_s):
            err = msg.error()
            if err is None:
                out.append((msg, self.codec.decode(msg.value()) if self.codec else None))
            elif err.fatal() or err.code() != KafkaError._PARTITION_EOF:
                raise KafkaException(err)
        return out

    def read(self, *, follow: bool = False, idle_s: float = 5.0,
             stop: Callable[[], bool] | None = None, until_end: bool = False
             ) -> Iterator[tuple[Message, dict[str, Any] | None]]:
        """Every record from the beginning; without ``follow``, stop after ``idle_s`` of quiet,
        and with ``until_end`` as soon as every partition is read up to its end offset as it
        was when the read began (no waiting out ``idle_s``). ``stop``: asked between two polls
        (at most half a second apart); True ends the read."""
        behind = self._ends() if until_end and not follow else None
        quiet_since = time.monotonic()
        while stop is None or not stop():
            if behind is not None and not behind:
                return
            records = self.poll()
            if records:
                quiet_since = time.monotonic()
                for msg, record in records:
                    partition, offset = msg.partition(), msg.offset()
                    if behind is not None and partition is not None and offset is not None \
                            and offset + 1 >= behind.get(partition, 0):
                        behind.pop(partition, None)
                    yield msg, record
            elif not follow and time.monotonic() - quiet_since >= idle_s:
                return

    def _ends(self) -> dict[int, int] | None:
        """Partition -> end offset of the partitions holding records now, from fetches' high
        watermarks (bus/offsets.py; ListOffsets answers the embedded broker's last batch's
        base offset + 1, which ended a read at 1,000 of 3,000 records); None if the brokers do
        not say (the read then ends on quiet alone). A transactional topic's last offset is a
        commit marker, never read: the read ends on quiet there."""
        try:
            marks = watermarks(self.connection, self.topic)
        except (KafkaException, WaitTimeout):
            return None
        return {p: high for p, (low, high) in marks.items() if high > low}

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def latest_revisions(records: Iterable[dict[str, Any] | None], *, streaming: bool = False
                     ) -> Iterator[dict[str, Any]]:
    """The highest revision of each order among prediction ``records`` (the later record on a
    tie), not the latest offset: a correction may be read before the revision it replaces.
    Without ``streaming``, once all are read, one per order in the order orders first
    appeared; with it, each record that raises its order's revision as it comes (a consumer
    keeps the last line per order)."""
    best: dict[str, dict[str, Any]] = {}
    for raw in records:
        record = decoded(raw)
        before = best.get(record["order_id"])
        if before is not None and record["revision"] < before["revision"]:
            continue
        best[record["order_id"]] = record
        if streaming:
            yield record
    if not streaming:
        yield from best.values()


def decoded(record: dict[str, Any] | None) -> dict[str, Any]:
    """A record of a reader made with a schema (which never yields None)."""
    if record is None:
        raise TypeError("this reader was made without a schema: it yields no records")
    return record


def collect(connection: ConnectionSettings, topic: str, schema_name: str, expected_ids: set[str], *,
            timeout_s: float, since_ms: int = 0, settle_s: float = 0.0
            ) -> dict[str, list[dict[str, Any]]]:
    """Read ``topic`` until every id in ``expected_ids`` has a record scored at or after
    ``since_ms``, then on until ``settle_s`` pass without another record of them (corrected
    revisions that follow); returns every such record per order id, duplicates included, in
    topic order.

    Raises TimeoutError naming how many are missing if ``timeout_s`` passes first.
    """
    found: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + timeout_s
    last_record = time.monotonic()
    with TopicReader(connection, topic, schema_name) as reader:
        while expected_ids - found.keys() or time.monotonic() - last_record < settle_s:
            missing = expected_ids - found.keys()
            if missing and time.monotonic() > deadline:
                raise WaitTimeout(f"{len(missing)} of {len(expected_ids)} orders have no record "
                                   f"on {topic} after {timeout_s:.0f} s")
            for _, raw in reader.poll():
                record = decoded(raw)
                order_id = record["order"]["order_id"] if "order" in record else record["order_id"]
                if record["scored_at_ms"] >= since_ms and order_id in expected_ids:
                    found.setdefault(order_id, []).append(record)
                    last_record = time.monotonic()
    return found


@dataclass
class Outcomes:
    """What became of consumed order records, by their (partition, offset) on the orders topic:
    every prediction made for each (duplicates included, in topic order), and the dead-letter
    reason of each dead-lettered one."""

    predictions: dict[tuple[int, int], list[dict[str, Any]]] = field(default_factory=dict)
    dead_letters: dict[tuple[int, int], str] = field(default_factory=dict)

    def settled(self) -> set[tuple[int, int]]:
        return self.predictions.keys() | self.dead_letters.keys()

    def latest(self, where: tuple[int, int]) -> dict[str, Any]:
        """The highest revision of the prediction at ``where`` (the later record on a tie)."""
        records = self.predictions[where]
        return max(reversed(records), key=lambda r: r["revision"])


def collect_outcomes(connection: ConnectionSettings, topics: TopicSettings,
                     positions: set[tuple[int, int]], *, since_ms: int = 0,
                     stall_s: float = 60.0, progress: Callable[[int], object] | None = None,
                     settle_s: float = 0.0, stop: Callable[[], bool] | None = None
                     ) -> Outcomes:
    """Read the predictions and the dead-letter topic until every order record at
    ``positions`` ((partition, offset) on the orders topic) has a prediction or a dead letter
    made at or after ``since_ms``; then go on reading until ``settle_s`` pass without a new
    prediction of them (corrected revisions that follow). ``progress(n)`` is told of each n
    newly settled records. ``stop()``, asked between two polls: True returns what was read so
    far.

    Raises TimeoutError, naming how many are missing, once ``stall_s`` pass with nothing new.
    """
    outcomes = Outcomes()
    topic = topics.orders_topic
    last_news = last_record = time.monotonic()
    with TopicReader(connection, topics.predictions_topic, "prediction") as predictions, \
            TopicReader(connection, topics.dlq_topic, None) as letters:
        while stop is None or not stop():
            settled = outcomes.settled()
            now = time.monotonic()
            if positions <= settled:
                if now - last_record >= settle_s:
                    return outcomes
            elif now - last_news > stall_s:
                missing = len(positions - settled)
                raise WaitTimeout(
                    f"{missing} of {len(positions)} orders have neither a prediction on "
                    f"{topics.predictions_topic} nor a dead letter on {topics.dlq_topic} "
                    f"after {stall_s:.0f} s without progress: are the workers running?")
            before = len(settled & positions)
            for _, raw in predictions.poll(timeout_s=0.2):
                record = decoded(raw)
                where = (record["order_partition"], record["order_offset"])
                if record["scored_at_ms"] >= since_ms and where in positions:
                    outcomes.predictions.setdefault(where, []).append(record)
                    last_record = time.monotonic()
            for msg, _ in letters.poll(timeout_s=0.05):
                headers = headers_dict(msg.headers())
                if headers.get(HEADER_PREFIX + "topic") != topic \
                        or msg.timestamp()[1] < since_ms:
                    continue
                where = (int(headers[HEADER_PREFIX + "partition"]),
                         int(headers[HEADER_PREFIX + "offset"]))
                if where in positions:
                    outcomes.dead_letters.setdefault(where, headers.get(REASON_HEADER, "unknown"))
            news = len(outcomes.settled() & positions) - before
            if news:
                last_news = time.monotonic()
                if progress is not None:
                    progress(news)
    return outcomes  # stopped
