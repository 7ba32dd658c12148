"""Committed offsets, end offsets and lag of a consumer group on a topic.

End offsets come from the high watermark in fetch responses (a throwaway consumer fetches at
most a kilobyte from each partition), not from ListOffsets: that is exact on Apache Kafka and
on the embedded broker alike, whose ListOffsets(latest) answers the last batch's base offset + 1.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from triage.bus.clients import make_consumer, partitions_of
from triage.bus.errors import WaitTimeout
from triage.bus.settings import ConnectionSettings


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    committed: int | None   # None: the group has committed nothing here yet
    start: int              # earliest offset still in the log
    end: int

    @property
    def lag(self) -> int:
        # Records deleted by retention before the group read them are not lag any more.
        return self.end - max(self.committed if self.committed is not None else 0, self.start)


_COORDINATOR_NOT_READY = frozenset({KafkaError.NOT_COORDINATOR,
                                    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                                    KafkaError.COORDINATOR_NOT_AVAILABLE,
                                    KafkaError._TIMED_OUT})


def committed_offsets(connection: ConnectionSettings, group: str, topic: str,
                      timeout_s: float = 30.0) -> dict[int, int | None]:
    """Per partition of ``topic``, the offset ``group`` committed, or None.

    Asked through a consumer of the group that never joins it (an OffsetFetch): on Apache
    Kafka 4 the admin client's ListConsumerGroupOffsets waited out its whole timeout for a
    group on a coordinator not loaded yet (a fresh cluster), where this retries and answers.
    Raises WaitTimeout if the group's coordinator does not answer within ``timeout_s``."""
    # read_uncommitted: a read_committed consumer asks for stable offsets (KIP-447) and waits
    # out any transaction in flight, up to its timeout (a killed worker's, say).
    consumer = make_consumer(connection, group, **{"isolation.level": "read_uncommitted"})
    try:
        partitions = partitions_of(consumer, topic)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                result = consumer.committed(partitions, timeout=max(1.0, timeout_s / 3))
                break
            except KafkaException as exc:
                if exc.args[0].code() not in _COORDINATOR_NOT_READY \
                        or time.monotonic() > deadline:
                    raise WaitTimeout(f"the coordinator of group {group} did not answer: "
                                      f"{exc.args[0].str()}") from None
                time.sleep(0.2)
    finally:
        consumer.close()
    return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in result}


def watermarks(connection: ConnectionSettings, topic: str, timeout_s: float = 30.0
               ) -> dict[int, tuple[int, int]]:
    """(earliest, end) offset of every partition of ``topic``."""
    consumer = make_consumer(connection, f"triage-offsets-{uuid.uuid4().hex}",
                             **{"max.partition.fetch.bytes": 1024})
    try:
        partitions = partitions_of(consumer, topic)
        consumer.assign([TopicPartition(topic, tp.partition, OFFSET_BEGINNING)
                         for tp in partitions])
        deadline = time.monotonic() + timeout_s
        marks: dict[int, tuple[int, int]] = {}
        while len(marks) < len(partitions):
            if time.monotonic() > deadline:
                raise WaitTimeout(f"no fetch response from {topic} partitions "
                                   f"{sorted({tp.partition for tp in partitions} - set(marks))}")
            consumer.consume(100, 0.1)
            for tp in partitions:
                low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0:
                    marks[tp.partition] = (max(low, 0), high)
        return marks
    finally:
        consumer.close()


def group_lag(connection: ConnectionSettings, group: str, topic: str) -> list[PartitionLag]:
    """Per partition of ``topic``: what ``group`` committed, the earliest and end offsets."""
    committed = committed_offsets(connection, group, topic)
    marks = watermarks(connection, topic)
    return [PartitionLag(p, committed[p], *marks[p]) for p in sorted(marks)]
