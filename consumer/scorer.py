"""The scorer one worker process runs: the Kafka loop (:mod:`triage.consumer.loop`) around the
scoring core (:mod:`triage.consumer.core`).

Per batch the loop consumes, this module turns the records into the core's input, the core
decides what becomes of each, and this module turns that into records to produce: predictions
(Avro, keyed by order) to the predictions topic, sampled ones to the drift topic, and dead
letters, with Kafka Connect's headers and the original key and value, fitted to what the
producer and topic take (:mod:`triage.consumer.deadletter`), to the dead-letter topic. The
loop then waits for every acknowledgement and commits: at-least-once, or one transaction per
batch with ``--exactly-once``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from confluent_kafka import Message

from triage.bus.clients import (
    PRODUCER_MAX_MESSAGE_BYTES,
    source_of,
    topic_max_message_bytes,
)
from triage.bus.settings import ScorerSettings, Settings
from triage.consumer import metrics
from triage.consumer.core import CoreConfig, Incoming, Outcome, ScoringCore, split_hooks
from triage.consumer.deadletter import dead_letter_headers, fit_dead_letter
from triage.consumer.loop import BatchLoop, Output
from triage.consumer.validation import OrderValidator
from triage.model.artifact import Model
from triage.model.reference import ReferenceTables
from triage.schemas.codec import codec_for


@dataclass
class ScorerStats:
    consumed: int = 0
    predicted: int = 0
    sampled: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    batches: int = 0

    def count(self, outcome: Outcome) -> None:
        self.consumed += outcome.size
        self.predicted += len(outcome.predictions)
        self.sampled += len(outcome.samples)
        self.dead_lettered.update(d.reason for d in outcome.dead_letters)
        self.batches += 1

    def as_dict(self) -> dict[str, object]:
        return {"consumed": self.consumed, "predicted": self.predicted, "sampled": self.sampled,
                "dead_lettered": dict(self.dead_lettered), "batches": self.batches}


def core_config(scorer: ScorerSettings) -> CoreConfig:
    return CoreConfig(max_message_bytes=scorer.max_message_bytes,
                      sample_rate=scorer.sample_rate,
                      deadline_s=scorer.processing_deadline_ms / 1000.0)


class Scorer:
    """One worker's scorer: ``run()`` until ``request_stop()``; counts in ``stats``.

    ``extra_hooks``: the hooks of ``TRIAGE_HOOKS``, run after the built-in validation under
    the batch's deadline."""

    def __init__(self, settings: Settings, model: Model, reference: ReferenceTables,
                 worker_id: str = "0", status_file: Path | None = None,
                 extra_hooks: list[object] | None = None) -> None:
        self.settings = settings
        connection, topics = settings.connection, settings.topics
        self.topics = topics
        self.model = model
        self.log = structlog.get_logger("scorer").bind(worker=worker_id)
        self.worker_id = worker_id
        checks, observers = split_hooks(extra_hooks or [])
        self.core = ScoringCore(
            model, reference, codec_for(connection, "order", topics.orders_topic),
            config=core_config(settings.scorer),
            checks=[OrderValidator(settings.validation), *checks],
            observers=observers, log=self.log)
        self.predictions = codec_for(connection, "prediction", topics.predictions_topic)
        self.samples = codec_for(connection, "drift_sample", topics.drift_topic)
        # The largest dead letter the producer and the dead-letter topic both accept.
        topic_limit = topic_max_message_bytes(connection, topics.dlq_topic)
        self.dead_letter_limit = min(PRODUCER_MAX_MESSAGE_BYTES,
                                     topic_limit or PRODUCER_MAX_MESSAGE_BYTES)
        self.stats = ScorerStats()
        self.loop = BatchLoop(connection, settings.scorer, topics.orders_topic,
                              worker_id=worker_id, status_file=status_file,
                              log=self.log, progress=self.stats.as_dict)

    @property
    def assigned(self) -> set[int]:
        return self.loop.assigned

    def request_stop(self) -> None:
        """Finish the batch in hand, commit it, leave the group (safe from a signal handler)."""
        self.loop.request_stop()

    def lag(self) -> int | None:
        return self.loop.lag()

    def run(self) -> ScorerStats:
        self.log.info("worker_started", topic=self.topics.orders_topic,
                      group=self.settings.scorer.group_id, model_version=self.model.version,
                      exactly_once=self.loop.committer.transactional)
        try:
            self.loop.run(self.handle)
        finally:
            self.log.info("worker_stopped", **self.stats.as_dict())
        return self.stats

    def handle(self, records: list[Message]) -> list[Output]:
        """One consumed batch -> the records to produce for it."""
        sources = [source_of(m) for m in records]
        outcome = self.core.process([Incoming(m.value(), m.key(), source)
                                     for m, source in zip(records, sources, strict=True)])
        encode_prediction, encode_sample = self.predictions.encode, self.samples.encode
        topics = self.topics
        out = [Output(topics.predictions_topic, p.key, encode_prediction(p.record))
               for p in outcome.predictions]
        out += [Output(topics.drift_topic, s.key, encode_sample(s.record))
                for s in outcome.samples]
        for letter in outcome.dead_letters:
            msg = records[letter.index]
            # Fitted to what the producer and the topic accept: a dead letter that cannot be
            # sent would stop the loop on the very record it is about.
            key, value, headers = fit_dead_letter(
                msg.key(), msg.value(),
                dead_letter_headers(sources[letter.index], letter.reason, letter.error_class,
                                    letter.message, self.worker_id),
                self.dead_letter_limit)
            out.append(Output(topics.dlq_topic, key, value, headers))
        self.stats.count(outcome)
        metrics.CONSUMED.inc(outcome.size)
        return out
