"""A control topic: one partition, compacted, whose latest record is the whole state (the
models control topic, ``TRIAGE_MODELS_TOPIC``, scoring/follower.py). The Kafka part only: values
are bytes here; what they mean is the caller's, given as callbacks.

Read with ``assign()`` from the beginning, never through a consumer group and never committed:
the group id only names the reader. Reading "to the end" stops at the high watermark the fetches
report, not ListOffsets (the embedded broker answers ListOffsets wrongly after batched produces;
docs/operating.md).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from triage.bus.clients import make_consumer, make_producer, produce
from triage.bus.errors import InfrastructureError
from triage.bus.settings import ConnectionSettings

_POLL_S = 0.1


def read_values(connection: ConnectionSettings, topic: str, timeout_s: float = 30.0
                ) -> list[bytes]:
    """Every non-null value on partition 0 of ``topic``, in offset order, read up to its high
    watermark. Raises InfrastructureError if the topic cannot be read to its end within
    ``timeout_s`` seconds (it does not exist, or the broker does not answer)."""
    consumer = make_consumer(connection, f"triage-control-{uuid.uuid4().hex[:12]}")
    tp = TopicPartition(topic, 0, OFFSET_BEGINNING)
    consumer.assign([tp])
    values: list[bytes] = []
    position = 0
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            for msg in consumer.consume(100, _POLL_S):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise InfrastructureError(f"{topic}: {err.str()}")
                position = (msg.offset() or 0) + 1
                value = msg.value()
                if value is not None:
                    values.append(value)
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0 and position >= high:
                return values
            if time.monotonic() > deadline:
                raise InfrastructureError(f"could not read {topic} to its end within "
                                          f"{timeout_s:.0f} s (does it exist? `triage topics "
                                          "create` makes it)")
    finally:
        consumer.close()


def publish_value(connection: ConnectionSettings, topic: str, key: bytes, value: bytes,
                  timeout_s: float = 30.0) -> None:
    """Write one record to ``topic`` and wait for the broker's acknowledgement. Raises
    InfrastructureError if it was not acknowledged within ``timeout_s`` seconds."""
    producer = make_producer(connection)
    errors: list[str] = []
    produce(producer, topic, key=key, value=value,
            on_delivery=lambda err, _: errors.append(err.str()) if err else None)
    if producer.flush(timeout_s) or errors:
        why = errors[0] if errors else f"no acknowledgement in {timeout_s:g} s"
        raise InfrastructureError(f"the record was not written to {topic}: {why}")


class ControlTopicFollower:
    """Follows partition 0 of ``topic`` from the beginning on a thread of its own, for as long
    as it runs: ``on_value(bytes)`` for each non-null record in offset order, then ``on_idle()``
    after each poll (about every 0.1 s). An exception raised by a callback is logged
    (``control_topic_callback_failed``), handed to ``on_error`` and the thread goes on after
    1 s; consumer errors (a missing topic) are logged once each."""

    def __init__(self, connection: ConnectionSettings, topic: str, *,
                 on_value: Callable[[bytes], None], on_idle: Callable[[], None] = lambda: None,
                 on_error: Callable[[BaseException], None] = lambda exc: None,
                 log: Any = None, name: str = "control-topic") -> None:
        self.topic = topic
        self.on_value, self.on_idle, self.on_error = on_value, on_idle, on_error
        self.log = log or structlog.get_logger("control_topic")
        self.consumer = make_consumer(connection, f"triage-control-{uuid.uuid4().hex[:12]}")
        self.consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> ControlTopicFollower:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.consumer.close()

    def _run(self) -> None:
        reported: set[str] = set()  # consumer errors already logged (a missing topic repeats)
        while not self._stop.is_set():
            try:
                for msg in self.consumer.consume(100, _POLL_S):
                    err = msg.error()
                    value = msg.value()
                    if err is None and value is not None:
                        self.on_value(value)
                    elif err is not None and err.code() != KafkaError._PARTITION_EOF \
                            and err.str() not in reported:
                        reported.add(err.str())
                        self.log.error("control_topic_error", topic=self.topic, error=err.str(),
                                       note="`triage topics create` makes the control topic")
                self.on_idle()
            except Exception as exc:  # never let the thread die silently: say so, go on
                self.on_error(exc)
                self.log.exception("control_topic_callback_failed", topic=self.topic,
                                   error=str(exc))
                self._stop.wait(1.0)
