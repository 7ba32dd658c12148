"""Tools for the dead-letter topic: count and look at what is there, and send it back.

``replay`` re-publishes records to the orders topic with their original key and value, for
example after a fix to a validation bound or a schema. Each replayed record carries the header
``triage.replayed-from`` = ``<dlq topic>/<partition>/<offset>``. It replays up to the end the
topic had when it started. Running it twice sends the records twice; the scorer is
at-least-once anyway and predictions are keyed by ``order_id``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message

from triage.bus.clients import make_producer, produce, source_of
from triage.bus.deadletter import REASON_HEADER, headers_dict
from triage.bus.offsets import watermarks
from triage.consumer.reader import TopicReader
from triage.consumer.settings import WorkerSettings
from triage.schemas.codec import Codec, DecodeError, codec_for

REPLAY_HEADER = "triage.replayed-from"


@dataclass
class DlqReport:
    counts: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        lines = [f"{self.total} dead-lettered records"]
        for reason, count in self.counts.most_common():
            lines.append(f"  {reason:<22}{count:>8}")
            lines += [f"      {sample}" for sample in self.samples.get(reason, [])]
        return "\n".join(lines)


def inspect(settings: WorkerSettings, *, samples_per_reason: int = 3, idle_s: float = 3.0
            ) -> DlqReport:
    """Count the dead letters by reason; keep a few samples of each, decoded where possible."""
    codec = codec_for(settings.connection, "order", settings.topics.orders_topic)
    report = DlqReport()
    with TopicReader(settings.connection, settings.topics.dlq_topic, None) as reader:
        for msg, _ in reader.read(idle_s=idle_s):
            headers = headers_dict(msg.headers())
            reason = headers.get(REASON_HEADER, "unknown")
            report.counts[reason] += 1
            samples = report.samples.setdefault(reason, [])
            if len(samples) < samples_per_reason:
                samples.append(_sample(msg.value(), headers, codec))
    return report


def reasons_of(settings: WorkerSettings, order_ids: set[str], idle_s: float = 2.0
               ) -> dict[str, str]:
    """Order id -> ``reason: message`` of the latest dead letter of each of ``order_ids`` on
    the dead-letter topic (its key is the order record's key: the order id). Reads the topic
    up to its end as it was when asked."""
    found: dict[str, str] = {}
    with TopicReader(settings.connection, settings.topics.dlq_topic, None) as reader:
        for msg, _ in reader.read(idle_s=idle_s, until_end=True):
            key = (msg.key() or b"").decode(errors="replace")
            if key in order_ids:
                headers = headers_dict(msg.headers())
                found[key] = (f"{headers.get(REASON_HEADER, 'unknown')}: "
                              f"{headers.get('__connect.errors.exception.message', '')[:200]}")
    return found


def _sample(value: bytes | None, headers: dict[str, str], codec: Codec) -> dict[str, Any]:
    sample: dict[str, Any] = {
        "source": f"{headers.get('__connect.errors.topic')}/"
                  f"{headers.get('__connect.errors.partition')}/"
                  f"{headers.get('__connect.errors.offset')}",
        "error": headers.get("__connect.errors.exception.message", "")[:200],
    }
    try:
        sample["order"] = codec.decode(value)
    except DecodeError:
        sample["bytes"] = len(value) if value is not None else None
        sample["head"] = value[:24].hex() if value else ""
    return sample


@dataclass(frozen=True)
class DlqReplaySummary:
    republished: int
    skipped: int
    failed: int

    def __str__(self) -> str:
        return (f"republished {self.republished}, skipped {self.skipped} (other reasons), "
                f"failed {self.failed}")


def replay(settings: WorkerSettings, *, reason: str | None = None, idle_s: float = 3.0
           ) -> DlqReplaySummary:
    """Re-publish dead letters (those with ``reason``, or all) to the orders topic."""
    producer = make_producer(settings.connection)
    failures: list[str] = []

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(err.str())

    # Stop at the end the topic had when we started: records dead-lettered again while we
    # replay (the cause is not fixed after all) must not be replayed again, forever.
    marks = watermarks(settings.connection, settings.topics.dlq_topic)
    ends = {p: high for p, (_, high) in marks.items()}
    republished = skipped = 0
    with TopicReader(settings.connection, settings.topics.dlq_topic, None) as reader:
        for msg, _ in reader.read(idle_s=idle_s):
            source = source_of(msg)
            if source.offset >= ends.get(source.partition, 0):
                continue
            if reason is not None and headers_dict(msg.headers()).get(REASON_HEADER) != reason:
                skipped += 1
                continue
            origin = f"{source.topic}/{source.partition}/{source.offset}"
            produce(producer, settings.topics.orders_topic, key=msg.key(), value=msg.value(),
                    headers=[(REPLAY_HEADER, origin.encode())], on_delivery=delivered)
            producer.poll(0)
            republished += 1
    undelivered = producer.flush(60.0)
    return DlqReplaySummary(republished - len(failures) - undelivered, skipped,
                            len(failures) + undelivered)
