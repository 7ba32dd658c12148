"""bus/clients.produce_batch: the records of a run queued in their order, to the partition of
the call; never refused for a full local queue (it waits for room first); a refused record
raises its error."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from triage.bus.clients import PRODUCER_QUEUE_MESSAGES, produce_batch


class QueueProducer:
    """A producer whose local queue holds ``queued`` records; each poll() delivers ``drains``
    of them. produce_batch() refuses, with QUEUE_FULL as librdkafka does, every message past
    the queue's room, and the message ``refuse`` names with MSG_SIZE_TOO_LARGE."""

    def __init__(self, queued: int, drains: int, refuse: bytes | None = None) -> None:
        self.queued, self.drains, self.refuse = queued, drains, refuse
        self.polls = 0
        self.sent: list[bytes] = []
        self.partitions: list[int] = []  # of each produce_batch call

    def __len__(self) -> int:
        return self.queued

    def poll(self, timeout: float = 0) -> int:
        self.polls += 1
        self.queued = max(0, self.queued - self.drains)
        return self.drains

    def produce_batch(self, topic: str, messages: list[dict[str, Any]], partition: int = -1,
                      on_delivery: Any = None) -> int:
        self.partitions.append(partition)
        ok = 0
        for message in messages:
            if self.queued >= PRODUCER_QUEUE_MESSAGES:
                message["_error"] = KafkaError(KafkaError._QUEUE_FULL)
            elif message["value"] == self.refuse:
                message["_error"] = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
            else:
                self.queued += 1
                self.sent.append(message["value"])
                ok += 1
        return ok


def _messages(n: int) -> list[dict[str, Any]]:
    return [{"key": None, "value": b"%d" % i} for i in range(n)]


def test_a_run_waits_for_room_in_the_queue_and_goes_whole_in_order() -> None:
    producer = QueueProducer(queued=PRODUCER_QUEUE_MESSAGES - 10, drains=7)
    produce_batch(producer, "t", _messages(30), 4)  # type: ignore[arg-type]
    assert producer.sent == [b"%d" % i for i in range(30)] and producer.partitions == [4]
    assert producer.polls == 3  # 100,000 - 10 - 21 queued: room for 30


def test_a_run_longer_than_half_the_queue_goes_in_chunks_in_order() -> None:
    producer = QueueProducer(queued=0, drains=PRODUCER_QUEUE_MESSAGES)
    count = PRODUCER_QUEUE_MESSAGES + 3
    produce_batch(producer, "t", _messages(count))  # type: ignore[arg-type]
    assert producer.sent == [b"%d" % i for i in range(count)]


def test_a_refused_message_raises_its_error() -> None:
    producer = QueueProducer(queued=0, drains=0, refuse=b"2")
    with pytest.raises(KafkaException) as raised:
        produce_batch(producer, "t", _messages(4))  # type: ignore[arg-type]
    assert raised.value.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
    assert producer.sent == [b"0", b"1", b"3"]  # librdkafka goes on past it: no commit follows
