"""A global reader: every partition of a set of topics, read from the beginning with
``assign()``, never through a consumer group and never committed, including topics and partitions
that appear after start (looked for every ``TRIAGE_METADATA_REFRESH_MS``). Kafka Streams reads a
GlobalKTable this way. The reference streams are read so (scoring/feed.py), by the Kafka worker
and the HTTP gateway alike.

The Kafka part only: records are handed over as they are, per partition, to callbacks; what they
mean (decoding, tables, the event-time gate) is the caller's.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from triage.bus.clients import Source, make_consumer, records_of, source_of
from triage.bus.settings import ConnectionSettings

#: ``on_partitions(name, new partitions, partition count of its topic now)``
OnPartitions = Callable[[str, list[int], int], None]
#: ``on_records(name, partition, [(coordinates, record)] in offset order)``
OnRecords = Callable[[str, int, Sequence[tuple[Source, Message]]], None]
#: ``on_position(name, partition, low watermark, high watermark)`` from the latest fetch
OnPosition = Callable[[str, int, int, int], None]


class GlobalReader:
    """Reads the topics ``topics`` (name -> topic) with ``assign()`` (module docstring).

    ``co_partitioned``: topic -> the topic it is expected to have as many partitions as (the
    payments and the orders): a difference is warned about once per change
    (``<name>_not_co_partitioned``, e.g. ``payments_not_co_partitioned``), nothing else. A
    topic that does not exist is logged once
    (``reference_topic_missing``), read as a topic without records, and looked for again.
    """

    def __init__(self, connection: ConnectionSettings, topics: Mapping[str, str], *,
                 on_partitions: OnPartitions, on_records: OnRecords, on_position: OnPosition,
                 co_partitioned: Mapping[str, str] | None = None, log: Any = None) -> None:
        self.topic_of = dict(topics)
        self.name_of = {topic: name for name, topic in self.topic_of.items()}
        self.on_partitions, self.on_records, self.on_position = (on_partitions, on_records,
                                                                 on_position)
        self.co_partitioned = dict(co_partitioned or {})
        self.log = log or structlog.get_logger("global_reader")
        self.consumer: Consumer = make_consumer(connection, f"triage-global-{uuid.uuid4().hex}")
        self.missing: set[str] = set()
        self.assigned: list[TopicPartition] = []
        self.refresh_s = connection.metadata_refresh_ms / 1000.0
        self._looked_at = -math.inf
        self._warned_counts: dict[str, tuple[int, int]] = {}

    def discover(self) -> list[TopicPartition]:
        """Assign the partitions not read yet, from the beginning, calling ``on_partitions``
        for each topic that has some; returns them. Asks for the metadata of every topic, which
        creates none (a request naming a topic may create it on a broker that auto-creates
        topics). A metadata request that fails is logged and tried again at the next refresh."""
        self._looked_at = time.monotonic()
        try:
            known = self.consumer.list_topics(timeout=5.0).topics
        except KafkaException as exc:
            self.log.warning("reference_metadata_failed", error=str(exc))
            return []
        reading = {(tp.topic, tp.partition) for tp in self.assigned}
        added: list[TopicPartition] = []
        for name, topic in self.topic_of.items():
            meta = known.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                if topic not in self.missing:
                    self.missing.add(topic)
                    self.log.warning("reference_topic_missing", stream=name, topic=topic,
                                     note="looked for again every TRIAGE_METADATA_REFRESH_MS; "
                                     "until then orders wait for it up to "
                                     "TRIAGE_REFERENCE_MAX_WAIT_MS, unless a CSV snapshot was "
                                     "loaded")
                continue
            if topic in self.missing:
                self.missing.discard(topic)
                self.log.info("reference_topic_found", stream=name, topic=topic,
                              partitions=len(meta.partitions))
            new = sorted(p for p in meta.partitions if (topic, p) not in reading)
            self.on_partitions(name, new, len(meta.partitions))
            if new and self.assigned:
                self.log.info("reference_partitions_added", topic=topic, partitions=new)
            added += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in new]
        if added:
            self.consumer.incremental_assign(added)
            self.assigned += added
        self._check_counts(known)
        return added

    def _check_counts(self, known: Mapping[str, Any]) -> None:
        """Warn, once per change, when a co-partitioned topic and its partner have different
        partition counts (one of them grew)."""
        for topic, partner in self.co_partitioned.items():
            ours, theirs = known.get(topic), known.get(partner)
            if ours is None or theirs is None or ours.error or theirs.error:
                continue
            counts = (len(ours.partitions), len(theirs.partitions))
            if counts[0] != counts[1] and counts != self._warned_counts.get(topic):
                self.log.warning(
                    f"{self.name_of.get(topic, topic)}_not_co_partitioned", topic=topic,
                    partitions=counts[0],
                    partner=partner, partner_partitions=counts[1],
                    note=f"grow both topics to the same count (kafka-topics.sh --alter "
                         f"--partitions N, {topic} first); meanwhile every order is still "
                         "joined right (every worker reads every partition of it), but its "
                         "records no longer share their order's partition number")
            self._warned_counts[topic] = counts

    def poll(self, max_records: int = 20_000, timeout_s: float = 0.0) -> int:
        """Hand what has arrived (up to ``max_records``) to ``on_records``, partition by
        partition, after looking for new topics and partitions if it is time; then report every
        assigned partition's watermarks known from the fetches to ``on_position``. Returns the
        number of records handed over. Raises KafkaException for a fatal consumer error."""
        if time.monotonic() - self._looked_at >= self.refresh_s:
            self.discover()
        batch = records_of(self.consumer.consume(max_records, timeout_s), self.log)
        by_partition: dict[tuple[str, int], list[tuple[Source, Message]]] = {}
        for msg in batch:
            source = source_of(msg)
            by_partition.setdefault((source.topic, source.partition), []).append((source, msg))
        for (topic, partition), items in by_partition.items():
            self.on_records(self.name_of[topic], partition, items)
        for tp in self.assigned:
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                self.on_position(self.name_of[tp.topic], tp.partition, low, high)
        return len(batch)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # closed already (a reader that failed)
            self.consumer.close()
