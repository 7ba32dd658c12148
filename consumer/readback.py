"""Reading back what a worker's consumer group published: after a restart or a rebalance, a
worker assigned an orders partition reads that partition's predictions of the last
``TRIAGE_CORRECTION_RETENTION_S`` back from the predictions topic, so that the corrections of
scoring/corrections.py go on from what is out (the module docstring there says why)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from triage.bus.clients import make_consumer, records_of
from triage.bus.settings import ConnectionSettings
from triage.schemas.codec import codec_for

# consume() waits out its whole timeout unless it fills its batch, and the end-of-partition
# events that end the read-back do not cut it short: with a 0.5 s poll, every start and every
# assignment waited 0.5 s even with nothing to read (measured on the embedded broker, which
# also gives offset 0, not -1, for an empty partition's offsets_for_times). Short polls end
# it within this of the last end-of-partition event.
_POLL_S = 0.05


def read_published(connection: ConnectionSettings, topic: str, order_partitions: Sequence[int],
                   topic_partitions: Sequence[int], since_ms: int, log: Any = None
                   ) -> dict[int, list[dict[str, Any]]]:
    """The predictions of orders from ``order_partitions`` published on ``topic``'s
    ``topic_partitions`` since ``since_ms`` (wall clock, by offsets for that time), up to the
    end of each partition: per orders partition, the highest revision of each order (the later
    record on a tie). Records the HTTP door made belong to no orders partition (theirs is
    -1): they are not read back.

    Raises KafkaException if the broker cannot be read."""
    log = log or structlog.get_logger("revisions")
    wanted = set(order_partitions)
    best: dict[str, dict[str, Any]] = {}
    if not wanted or not topic_partitions:
        return {}
    codec = codec_for(connection, "prediction", topic)
    consumer = make_consumer(connection, f"triage-revisions-{uuid.uuid4().hex}",
                             **{"enable.partition.eof": True})
    started = time.monotonic()
    try:
        starts = consumer.offsets_for_times(
            [TopicPartition(topic, p, since_ms) for p in topic_partitions], timeout=30.0)
        reading = {tp.partition for tp in starts if tp.offset >= 0}
        consumer.assign([tp for tp in starts if tp.offset >= 0])
        records = 0
        while reading:
            if time.monotonic() - started > 300.0:
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"reading {topic} "
                                                "back took over 300 s"))
            batch = consumer.consume(10_000, _POLL_S)
            for msg in batch:
                err = msg.error()
                if err is not None and err.code() == KafkaError._PARTITION_EOF:
                    reading.discard(msg.partition())
            for msg in records_of(batch, log):
                records += 1
                record = codec.decode(msg.value())
                if record["order_partition"] not in wanted:
                    continue
                before = best.get(record["order_id"])
                if before is None or record["revision"] >= before["revision"]:
                    best[record["order_id"]] = record
    finally:
        consumer.close()
    found: dict[int, list[dict[str, Any]]] = {}
    for record in best.values():
        found.setdefault(record["order_partition"], []).append(record)
    log.info("predictions_read_back", partitions=sorted(wanted), records=records,
             orders=len(best), elapsed_s=round(time.monotonic() - started, 2))
    return found
