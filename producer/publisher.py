"""The producer API: publish orders, and the reference streams, as Avro records.

:class:`RecordPublisher` publishes records of one contract to one topic, keyed by one field:
:class:`OrderPublisher` orders (keyed by ``order_id``), :func:`reference_publisher` the
reference streams (model/streams.py). ``triage replay`` and ``triage produce`` go through
them. The producer is idempotent
(``enable.idempotence``), so librdkafka's retries never duplicate a record, and partitions keys
as the Java client does (bus/clients.py), so payments land on their order's partition.
"""

from __future__ import annotations

import functools
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from triage.bus.clients import make_producer, produce, source_of
from triage.bus.errors import ConfigurationError
from triage.bus.settings import ConnectionSettings, TopicSettings
from triage.model.streams import ReferenceStream, by_name
from triage.schemas.codec import codec_for


class OrderError(ConfigurationError):
    """An order given on the command line or to :func:`order_record` is not valid."""


def parse_timestamp_ms(text: str) -> int:
    """``YYYY-MM-DD HH:MM:SS`` (or ISO 8601; UTC unless it says otherwise) -> epoch ms."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise OrderError(f"timestamp {text!r} is not YYYY-MM-DD HH:MM:SS") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def order_record(order_id: str, customer_id: str, sku_code: str, zip_code: str,
                 timestamp: str | None = None) -> dict[str, Any]:
    """An order record; the timestamp defaults to now."""
    fields = {"order_id": order_id, "customer_id": customer_id, "sku_code": sku_code,
              "zip_code": zip_code}
    empty = [name for name, value in fields.items() if not value]
    if empty:
        raise OrderError(f"empty {', '.join(empty)}")
    ts = parse_timestamp_ms(timestamp) if timestamp else int(datetime.now(UTC).timestamp() * 1000)
    return {**fields, "timestamp_ms": ts}


class RecordPublisher:
    """Encode and publish records of contract ``schema_name`` to ``topic``, keyed by the
    record's ``key_field``; count deliveries and failures from the broker's reports.
    ``producer``: share one (a replay of several streams); else one is made."""

    def __init__(self, connection: ConnectionSettings, topic: str, schema_name: str,
                 key_field: str, *, producer: Producer | None = None,
                 **producer_overrides: Any) -> None:
        self.topic = topic
        self.key_field = key_field
        self.codec = codec_for(connection, schema_name, topic)
        self.producer = producer or make_producer(connection, **producer_overrides)
        self.sent = 0
        self.failed = 0
        self.errors: Counter[str] = Counter()
        # Highest delivered offset + 1 per partition: where a consumer that read everything ends.
        self.end_offsets: dict[int, int] = {}
        # publish(..., position=i) -> (partition, offset) of that record, once acknowledged.
        self.delivered: dict[int, tuple[int, int]] = {}

    def publish(self, record: dict[str, Any], position: int | None = None) -> None:
        """Encode and send ``record``; with ``position``, its (partition, offset) is kept in
        ``delivered[position]`` once the broker acknowledged it."""
        value = self.codec.encode(record)
        key = str(record[self.key_field]).encode()
        report = self._report if position is None else functools.partial(self._report,
                                                                          position=position)
        produce(self.producer, self.topic, value=value, key=key, on_delivery=report)
        self.producer.poll(0)

    def _report(self, err: KafkaError | None, msg: Message, position: int | None = None
                ) -> None:
        if err is not None:
            self.failed += 1
            self.errors[err.str()] += 1
            return
        self.sent += 1
        source = source_of(msg)
        partition, offset = source.partition, source.offset
        self.end_offsets[partition] = max(self.end_offsets.get(partition, 0), offset + 1)
        if position is not None:
            self.delivered[position] = (partition, offset)

    def poll(self) -> None:
        self.producer.poll(0)

    def flush(self, timeout_s: float = 60.0) -> int:
        """Wait for outstanding deliveries; returns how many are still undelivered."""
        remaining = self.producer.flush(timeout_s)
        if remaining:
            self.failed += remaining
            self.errors["not delivered before the flush timeout"] += remaining
        return remaining


class OrderPublisher(RecordPublisher):
    """Orders (``schemas/order.avsc``) to the orders topic, keyed by ``order_id``."""

    def __init__(self, connection: ConnectionSettings, topic: str, **producer_overrides: Any
                 ) -> None:
        super().__init__(connection, topic, "order", "order_id", **producer_overrides)


def stream_publisher(stream: str, connection: ConnectionSettings, topics: TopicSettings,
                     producer: Producer) -> RecordPublisher:
    """The publisher of ``stream`` (``orders``, or a reference stream of model/streams.py:
    its schema, keyed by its key, on its topic), sharing ``producer`` (a replay or ``triage
    produce`` of several streams). Raises KeyError for a stream no one declared."""
    if stream == "orders":
        return OrderPublisher(connection, topics.orders_topic, producer=producer)
    return reference_publisher(by_name()[stream], connection, topics.topic_of(stream),
                               producer)


def reference_publisher(stream: ReferenceStream, connection: ConnectionSettings, topic: str,
                        producer: Producer | None = None) -> RecordPublisher:
    """Events of the reference stream ``stream`` (schemas/<its schema>.avsc) on ``topic``
    (``TopicSettings.topic_of(stream.name)``), keyed by its key: a co-partitioned one
    (payments, by ``order_id``) with the same key and partitioner as the orders, so it lands on
    its order's partition number."""
    return RecordPublisher(connection, topic, stream.schema, stream.key, producer=producer)
