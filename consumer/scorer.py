"""The scorer one worker process runs: the Kafka loop (:mod:`triage.consumer.loop`) around the
scoring core (:mod:`triage.scoring.core`).

Per batch the loop consumes, this module turns the records into the core's input, the core
decides what becomes of each, and this module turns that into records to produce: predictions
(Avro, keyed by order) to the predictions topic, sampled ones to the drift topic, and dead
letters, with Kafka Connect's headers and the original key and value, fitted to what the
producer and topic take (:mod:`triage.bus.deadletter`), to the dead-letter topic. The
loop commits a batch's offsets once every record it produced is acknowledged: at-least-once
(consumer/commit.py ``PipelinedAtLeastOnce``), or one transaction per batch with
``--exactly-once``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from confluent_kafka import Message, TopicPartition

from triage.bus.clients import (
    PRODUCER_MAX_MESSAGE_BYTES,
    Source,
    partitions_of,
    produce,
    source_of,
    topic_max_message_bytes,
)
from triage.bus.deadletter import dead_letter_headers, fit_dead_letter
from triage.bus.health import Health
from triage.consumer import metrics
from triage.consumer.loop import BatchLoop, Handled, Output
from triage.consumer.readback import read_published
from triage.consumer.settings import WorkerSettings
from triage.model.artifact import Model
from triage.model.reference import ReferenceTables
from triage.schemas.codec import codec_for
from triage.scoring.core import Incoming, Outcome, ScoringCore, core_config, split_hooks
from triage.scoring.corrections import RetainedOrders, kept_from_records
from triage.scoring.feed import Letter, Polled, ReferenceFeed, ReferenceReader
from triage.scoring.follower import ModelFollower
from triage.scoring.validation import OrderValidator
from triage.scoring.windowed import WindowedJoin, WindowedReader


@dataclass
class ScorerStats:
    consumed: int = 0
    predicted: int = 0
    sampled: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    expired: int = 0  # scored because the reference wait ran out
    windowed_expired: int = 0  # scored before the feature stage answered them
    corrected: int = 0  # revisions published for late reference events

    def count(self, outcome: Outcome) -> None:
        self.consumed += outcome.size
        self.expired += outcome.expired
        self.windowed_expired += outcome.windowed_expired
        # An order read again whose published revision still holds has its prediction.
        self.predicted += outcome.predicted + outcome.republished
        self.sampled += len(outcome.samples)
        self.dead_lettered.update(d.reason for d in outcome.dead_letters)
        self.batches += 1 if outcome.size else 0  # idle turns (reference polls) are no batch

    @property
    def settled(self) -> int:
        """Records that ended as a prediction or a dead letter (consumed ones may wait)."""
        return self.predicted + sum(self.dead_lettered.values())

    def as_dict(self) -> dict[str, object]:
        return {"consumed": self.consumed, "predicted": self.predicted, "sampled": self.sampled,
                "dead_lettered": dict(self.dead_lettered), "batches": self.batches,
                "reference_wait_expired": self.expired,
                "windowed_wait_expired": self.windowed_expired, "corrected": self.corrected}


class Scorer:
    """One worker's scorer: ``run()`` until ``request_stop()``; counts in ``stats``.

    ``snapshot``: the reference tables loaded from CSVs (``--reference``), or None to start
    from nothing. With ``live_reference`` (the default) the worker reads the reference streams
    on top (scoring/feed.py), orders wait for them by event time, and late events bring
    corrected revisions (scoring/corrections.py); without, it scores with the snapshot alone, at
    once. ``extra_hooks``: the hooks of ``TRIAGE_HOOKS``, run after
    the built-in validation under the batch's deadline. ``health``: beaten by the loop and the
    restore; its ``reference_restored`` condition met once the tables are restored.
    ``follower``: a worker following a model registry; the models it loads are swapped in
    before the next batch (scoring/follower.py). ``shadow``: a model scored beside ``model``
    from the start, its predictions to the shadow topic. ``loop``: the worker's batch loop, made
    (and maybe subscribed, see BatchLoop.subscribe) before the model loaded; else one is made."""

    def __init__(self, settings: WorkerSettings, model: Model, snapshot: ReferenceTables | None,
                 worker_id: str = "0", status_file: Path | None = None,
                 extra_hooks: Sequence[object] | None = None, live_reference: bool = True,
                 health: Health | None = None, follower: ModelFollower | None = None,
                 shadow: Model | None = None, loop: BatchLoop | None = None) -> None:
        self.settings = settings
        self.health = health
        self.follower = follower
        connection, topics = settings.connection, settings.topics
        self.topics = topics
        self.log = structlog.get_logger("scorer").bind(worker=worker_id)
        self.worker_id = worker_id
        tables = snapshot if snapshot is not None else ReferenceTables.empty()
        validator = OrderValidator(settings.validation)
        self.feed = ReferenceFeed(tables, settings.reference, validator,
                                  snapshot=snapshot is not None, log=self.log)
        self.reader = ReferenceReader(connection, topics, self.feed, log=self.log) \
            if live_reference else None
        checks, observers = split_hooks(extra_hooks or [])
        self.retained = RetainedOrders(settings.reference.correction_retention_s * 1000) \
            if live_reference else None
        self.core = ScoringCore(
            model, tables, codec_for(connection, "order", topics.orders_topic),
            config=core_config(settings.core), checks=[validator, *checks],
            observers=observers, gate=self.feed if live_reference else None,
            retained=self.retained, log=self.log)
        self.core.shadow = shadow
        self.windowed: WindowedReader | None = None
        self._join_windowed(model, shadow)
        self.predictions = codec_for(connection, "prediction", topics.predictions_topic)
        self.samples = codec_for(connection, "drift_sample", topics.drift_topic)
        # The largest dead letter the producer and the dead-letter topic both accept.
        topic_limit = topic_max_message_bytes(connection, topics.dlq_topic)
        self.dead_letter_limit = min(PRODUCER_MAX_MESSAGE_BYTES,
                                     topic_limit or PRODUCER_MAX_MESSAGE_BYTES)
        self.max_waiting = settings.reference.max_waiting_orders
        self.stats = ScorerStats()
        if loop is None:
            loop = BatchLoop(connection, settings.scorer, topics.orders_topic,
                             worker_id=worker_id, status_file=status_file, log=self.log,
                             health=health)
        loop.progress, loop.status = self.stats.as_dict, self.status
        self.loop = loop
        # Predictions go to the partition number of their order when the two topics have as
        # many partitions (then a partition's predictions are read back from one partition);
        # else by key. Set by run().
        self._prediction_partitions: list[int] = []
        self._same_count = False
        self._to_read_back: set[int] = set()  # assigned, not read back yet (on_assigned)
        self._consumed_upto: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}
        self._paused: set[int] = set()

    @property
    def assigned(self) -> set[int]:
        return self.loop.assigned

    def request_stop(self) -> None:
        """Finish the batch in hand, commit it, leave the group (safe from a signal handler)."""
        self.loop.request_stop()

    def lag(self) -> int | None:
        return self.loop.lag()

    def run(self, running: Callable[[], None] = lambda: None) -> ScorerStats:
        """Restore the global reference tables, then score until stopped; ``running()`` is
        called once, just before the batch loop consumes its first orders. Raises
        ConfigurationError if payments is not co-partitioned with orders."""
        self.log.info("worker_starting", topic=self.topics.orders_topic,
                      model_version=self.core.model.version,
                      live_reference=self.reader is not None,
                      reference_snapshot_records=self.feed.tables.size)
        letters: list[Letter] = []
        if self.windowed is not None:
            letters += self.windowed.start(stop=lambda: self.loop.stop_requested,
                                           progress=self._restore_progress)
        if self.reader is not None:
            self._count_partitions()
            self.reader.start(stop=lambda: self.loop.stop_requested)
            if self.loop.stop_requested:  # asked to stop while the brokers were being asked
                return self.stats
            letters += self.reader.restore(stop=lambda: self.loop.stop_requested,
                                           progress=self._restore_progress)
        if letters:  # dead letters met while restoring, before the loop runs
            for output in self._reference_letters(letters):
                produce(self.loop.producer, output.topic, key=output.key,
                        value=output.value, headers=output.headers)
            self.loop.producer.flush(60.0)
        if self.health is not None:
            self.health.met("reference_restored")
        self.log.info("worker_started", topic=self.topics.orders_topic,
                      group=self.settings.scorer.group_id, model_version=self.core.model.version,
                      exactly_once=self.loop.committer.transactional,
                      live_reference=self.reader is not None)
        running()
        try:
            self.loop.run(self)
        finally:
            if self.reader is not None:
                self.reader.close()
            if self.windowed is not None:
                self.windowed.close()
            self.log.info("worker_stopped", **self.stats.as_dict())
        return self.stats

    def _count_partitions(self) -> None:
        """How many partitions the orders and predictions topics have (see __init__)."""
        consumer = self.loop.consumer
        orders = len(partitions_of(consumer, self.topics.orders_topic))
        self._prediction_partitions = [tp.partition for tp in partitions_of(
            consumer, self.topics.predictions_topic)]
        self._same_count = orders == len(self._prediction_partitions)

    def _swap_model(self) -> None:
        """Between two batches: take the model the follower loaded, if any (scoring/follower.py)."""
        assert self.follower is not None
        models = self.follower.take()
        if models is None:
            return
        old, model = self.core.model, models.active
        self.core.shadow = models.shadow
        self._join_windowed(model, models.shadow, started=True)
        if model is not old:
            self.core.model = model
            metrics.MODEL_SWAPS.inc()
            metrics.MODEL_INFO.remove(old.version)
            metrics.MODEL_INFO.labels(model.version).set(1)
        self.log.info("model_swapped", version=model.version, replaced=old.version,
                      shadow=models.shadow.version if models.shadow else None)

    def _join_windowed(self, model: Model, shadow: Model | None, started: bool = False
                       ) -> None:
        """Join the feature stage's answers for the windowed features ``model`` and
        ``shadow`` read (scoring/windowed.py); a reader made after the start (a model swapped
        in) catches up between batches while the orders wait for it."""
        names = {*model.windowed, *(shadow.windowed if shadow is not None else ())}
        if self.windowed is not None:
            self.windowed.join.use(names)
            return
        if not names:
            return
        join = WindowedJoin(
            names, max_wait_s=self.settings.reference.reference_max_wait_ms / 1000.0,
            retention_ms=self.settings.windows.window_retention_s * 1000,
            skew_ms=self.settings.reference.max_clock_skew_ms)
        self.windowed = WindowedReader(self.settings.connection, self.topics, join,
                                       log=self.log)
        self.core.windowed = join
        self.log.info("windowed_features_joined", features=join.names,
                      topic=self.topics.windowed_features_topic)
        if started:
            self.windowed.reader.discover()

    def _restore_progress(self) -> None:
        """A step of the restore: the process is alive, and says how far it got."""
        if self.health is not None:
            self.health.beat()
        self.loop.write_status(partitions=[], restored=False,
                               reference_records=self.feed.tables.size)

    def status(self) -> dict[str, object]:
        """The status file's fields beyond the loop's: the worker is ready once restored."""
        return {"restored": True, "reference_records": self.feed.tables.size,
                "waiting_orders": sum(self.core.waiting_counts().values()),
                "reference_misplaced": sum(self.feed.misplaced.values()),
                "corrected": self.stats.corrected}

    # -- the loop's handler ----------------------------------------------------------------

    def pending(self) -> bool:
        """Reference records may arrive and waiting orders become ready with no new order;
        partitions assigned may wait to be read back."""
        return self.reader is not None or self.windowed is not None or bool(self._to_read_back)

    def handle(self, records: list[Message]) -> Handled:
        """One consumed batch (maybe empty) -> the records to produce, the offsets settled,
        and the partitions to pause or resume."""
        if self._to_read_back:
            self._read_back()
        if self.follower is not None:
            self._swap_model()
        polled = self.reader.poll() if self.reader is not None else Polled([], [])
        out = self._reference_letters(polled.letters)
        corrections = self.core.correct(polled.late) + self.core.verify()
        if self.windowed is not None:
            letters, answered = self.windowed.poll()
            out += self._reference_letters(letters)
            corrections += self.core.correct_windowed(answered)
        sources = [source_of(m) for m in records]
        # A partition's records come in offset order: its last one is the furthest consumed.
        last = {(source.topic, source.partition): source.offset for source in sources}
        consumed = self._consumed_upto
        for key, offset in last.items():
            if offset > consumed.get(key, -1):
                consumed[key] = offset
        outcome = self.core.process([Incoming(m.value(), m.key(), source)
                                     for m, source in zip(records, sources, strict=True)])
        encode_prediction, encode_sample = self.predictions.encode, self.samples.encode
        topics = self.topics
        for batch in outcome.scored:
            values = self.predictions.encode_columns(batch.columns, batch.size)
            if self._same_count:  # each prediction to its order's partition number
                topic = topics.predictions_topic
                out += [Output(topic, key, value, None, partition) for key, value, partition
                        in zip(batch.keys, values, batch.columns["order_partition"],
                               strict=True)]
            else:
                out += [Output(topics.predictions_topic, key, value)
                        for key, value in zip(batch.keys, values, strict=True)]
        out += [Output(topics.predictions_topic, c.key, encode_prediction(c.record), None,
                       c.partition if self._same_count else -1) for c in corrections]
        self.stats.corrected += len(corrections)
        out += [Output(topics.drift_topic, s.key, encode_sample(s.record))
                for s in outcome.samples]
        for batch in outcome.shadow_scored:
            out += [Output(topics.shadow_topic, key, value) for key, value in zip(
                batch.keys, self.predictions.encode_columns(batch.columns, batch.size),
                strict=True)]
        for letter in outcome.dead_letters:
            item, origin = letter.item, letter.item.source
            assert origin is not None and not isinstance(item.value, Mapping)  # from Kafka
            out.append(self._dead_letter(topics.dlq_topic, origin, item.key, item.value,
                                         letter.reason, letter.error_class, letter.message))
        if outcome.windowed_expired and not self.stats.windowed_expired:
            self.log.warning(
                "windowed_wait_expired", orders=outcome.windowed_expired,
                topic=self.topics.windowed_features_topic,
                note="orders were scored with their windowed features null (wait_expired) "
                     "because the feature stage had not answered within the max wait: is "
                     "`triage windows` running? Its answers correct them when they come")
        self.stats.count(outcome)
        metrics.CONSUMED.inc(outcome.size)
        pause, resume = self._flow_control()
        return Handled(out, self._settled_offsets(), pause, resume)

    def _settled_offsets(self) -> list[TopicPartition]:
        """Per partition, the next offset to commit: past every consumed order, except that an
        order still waiting, and all after it, stay uncommitted."""
        waiting = self.core.waiting_offsets()
        commit = []
        for key, upto in self._consumed_upto.items():
            target = min(waiting.get(key, upto + 1), upto + 1)
            if target > self._committed.get(key, -1):
                commit.append(TopicPartition(key[0], key[1], target))
                self._committed[key] = target
        return commit

    def _flow_control(self) -> tuple[list[int], list[int]]:
        """Pause a partition whose waiting orders reach the maximum; resume at half."""
        counts = self.core.waiting_counts()
        pause = [p for p, n in counts.items() if n >= self.max_waiting and p not in self._paused]
        resume = [p for p in self._paused if counts.get(p, 0) < self.max_waiting // 2]
        self._paused = (self._paused | set(pause)) - set(resume)
        return pause, resume

    def on_assigned(self, partitions: list[int]) -> None:
        """Partitions were assigned: what was published for their orders is read back at the
        start of the next handle(), before any of their orders is scored. Not here: a
        rebalance callback that makes blocking client calls breaks confluent-kafka's state
        for the next callback of the same consume() (seen under the KIP-848 protocol: an
        assertion, and the process aborted)."""
        if self.retained is not None:
            self._to_read_back |= set(partitions)

    def _read_back(self) -> None:
        """Read back what was published for the orders of the partitions assigned since the
        last turn, in the last retention period (scoring/corrections.py)."""
        assert self.retained is not None
        partitions = sorted(self._to_read_back & self.loop.assigned)
        self._to_read_back.clear()
        if not partitions:
            return
        self._count_partitions()
        since = int(time.time() * 1000) - self.retained.retention_ms
        found = read_published(
            self.settings.connection, self.topics.predictions_topic, partitions,
            partitions if self._same_count else self._prediction_partitions, since, self.log)
        for partition, records in found.items():
            self.core.read_back(kept_from_records(partition, records, time.monotonic(),
                                                  int(time.time() * 1000)))

    def on_revoked(self, partitions: list[int]) -> None:
        dropped = self.core.drop(partitions)
        if dropped:
            self.log.info("waiting_orders_dropped", orders=dropped, partitions=partitions,
                          note="uncommitted: the partitions' new owner reads them again")
        if self.retained is not None:
            self.retained.drop(partitions)
        gone = set(partitions)
        for table in (self._consumed_upto, self._committed):
            for key in [k for k in table if k[1] in gone]:
                del table[key]
        self._paused -= gone

    def _reference_letters(self, letters: list[Letter]) -> list[Output]:
        return [self._dead_letter(self.topics.reference_dlq_topic, source, key, value, reason,
                                  "ValidationError" if reason in VALIDATION_REASONS
                                  else "DecodeError", message)
                for source, key, value, reason, message in letters]

    def _dead_letter(self, topic: str, source: Source, key: bytes | None, value: bytes | None,
                     reason: str, error_class: str, message: str) -> Output:
        # Fitted to what the producer and the topic accept: a dead letter that cannot be sent
        # would stop the loop on the very record it is about.
        key, value, headers = fit_dead_letter(
            key, value, dead_letter_headers(source, reason, error_class, message,
                                            self.worker_id),
            self.dead_letter_limit)
        return Output(topic, key, value, headers)


VALIDATION_REASONS = frozenset({"missing_field", "invalid_field", "invalid_timestamp"})
