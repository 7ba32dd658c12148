"""The feature stage (``triage windows``): computes the windowed features of model/windows.py
for every order and publishes them, keyed by ``order_id``, to ``windowed_features``
(schemas/windowed_features.avsc). Instances form one consumer group
(``TRIAGE_WINDOWS_GROUP_ID``) and share the work as Kafka Streams' instances do; run as many
as the orders topic has partitions.

**Why a stage of its own.** The orders topic is keyed by ``order_id``: a scorer worker sees
only its share of a customer's orders. A customer's or a SKU's behaviour needs all of them in
one place, so the orders travel to their entity through Kafka, as Kafka Streams repartitions
a stream before an aggregation: each instance reads its share of the orders partitions and
forwards each order, unchanged, to ``<store>-repartition`` keyed by the entity (one store
per entity: ``windows.customer_id``, ``windows.sku_code``); each repartition partition is one
task (scoring/window_task.py) holding the windows of its entities. The values go out as a
stream keyed by ``order_id`` that a scorer joins like a reference stream (the next step of
issue 27); a stage of its own keeps the scorer's hot path, its batching and its consumer
group as they are, and lets the state scale on its own partitions.

**Marks.** A task answers an order once every orders partition has passed it, by the live
join's rules (scoring/window_task.py). The instance reading orders partition ``u`` forwards
each order with its publication time on ``orders`` (the record's timestamp), and then sends a
marker to every partition of every repartition topic (an empty record with the headers
``triage-upstream``, ``triage-watermark-ms`` and ``triage-quiet-ms``): the latest order time
read on ``u`` (at most the clock plus ``TRIAGE_MAX_CLOCK_SKEW_MS``), and, when ``u`` had
nothing left to read, the clock less ``TRIAGE_REFERENCE_LATENESS_MS``. A marker goes when
one moved, at most every 0.2 s a partition.

**Exactly once.** Each turn of the loop is one Kafka transaction: the orders forwarded, the
markers, the outputs, the changelog records and the consumed offsets of both the orders and
the repartition topics (consumer/commit.py ``ExactlyOnce``). A killed instance's open
transaction is aborted; its partitions go to the others, which restore the tasks from the
changelogs (reading ``read_committed`` to the end) and read on from the committed offsets:
the restored state, the outputs and the offsets are of the same committed turn, so no order
is counted twice or missed, under kills and rebalances alike. On the embedded broker, which
does not hide aborted transactions from readers, that holds only while no transaction is
aborted: no kill, no rebalance that overtakes a turn, no abortable error.

**Probes and metrics.** With ``--metrics-port`` (TRIAGE_METRICS_PORT), ``/metrics`` (the
``triage_windows_*`` metrics of :class:`WindowMetrics`), ``/healthz`` (a turn of the loop or a
restored task within TRIAGE_HEALTH_STALL_MS) and ``/readyz`` (the group joined), as a scorer
worker serves them (bus/health.py).

**Bad orders.** An order that does not decode is skipped here (its scorer dead-letters it:
every order record ends in a prediction or a dead letter there); the stage counts it
(``orders_skipped`` in its progress log line).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client import Counter as PromCounter

from triage.bus.clients import (
    check_brokers,
    make_consumer,
    make_producer,
    produce,
    records_of,
    require_topics,
)
from triage.bus.errors import BadRecord, ConfigurationError, InfrastructureError
from triage.bus.health import Health, serve
from triage.consumer.commit import LOST_OWNERSHIP, ExactlyOnce, next_offsets, transactional_id
from triage.consumer.settings import WorkerSettings
from triage.model.windows import (
    WINDOWED_FEATURES,
    WindowedFeature,
    changelog_topic,
    declared,
    repartition_topic,
    stores,
)
from triage.schemas.codec import codec_for
from triage.scoring.window_task import MIN_MS, WindowOutput, WindowTask, missing_output

UPSTREAM_HEADER = "triage-upstream"
WATERMARK_HEADER = "triage-watermark-ms"  # the latest order time read on the partition
QUIET_HEADER = "triage-quiet-ms"  # quiet with the clock the lateness past this
_PROGRESS_S = 10.0
# At most one marker per orders partition this often: a quiet partition's mark moves with the
# clock, and each marker goes to every partition of every store.
_MARK_EVERY_S = 0.2
_FLUSH_BEFORE_ABORT_S = 10.0


class WindowMetrics:
    """The stage's Prometheus metrics, in a registry of its own (docs/operating.md,
    "Metrics"). ``stores``: the entities of the stores this instance runs; their labelled
    series are exported at 0 from the start, so that ``increase()`` in an alert counts the
    first events too (Prometheus sees no increase from a series that appears already at N)."""

    def __init__(self, stores: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        # process_* (process_start_time_seconds: restarts) and python_*, as a worker has them.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.orders = PromCounter("triage_windows_orders_total",
                                  "Order records the stage read and forwarded to its stores.",
                                  registry=registry)
        self.answers = PromCounter(
            "triage_windows_answers_total",
            "Windowed feature values published (committed), by store and kind: expired "
            "(window_expired, whatever the revision), else first (revision 1) or correction "
            "(revision 2 and up).", ["store", "kind"], registry=registry)
        self.beyond = PromCounter(
            "triage_windows_beyond_retention_total",
            "Records further back than their store holds anything: what they change among "
            "orders already forgotten goes unflagged.", ["store"], registry=registry)
        self.rewinds = PromCounter("triage_windows_rewinds_total",
                                   "Turns aborted and read again from the committed state.",
                                   registry=registry)
        self.restore_seconds = Histogram(
            "triage_windows_restore_seconds", "Time to restore a task from its changelog.",
            buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry)
        self.held = Gauge("triage_windows_orders_held",
                          "Orders a store of this instance holds, answered or waiting (every "
                          "10 s).", ["store"], registry=registry)
        self.waiting = Gauge("triage_windows_waiting_orders",
                             "Orders of a store not answered yet: some orders partition has not "
                             "passed them (every 10 s).", ["store"], registry=registry)
        for store in stores:
            self.beyond.labels(store)
            self.held.labels(store)
            self.waiting.labels(store)
            for kind in ("first", "correction", "expired"):
                self.answers.labels(store, kind)

    def committed(self, orders: int, outputs: list[WindowOutput],
                  beyond: dict[str, int]) -> None:
        """Count a turn once its transaction committed (an aborted turn is read again)."""
        self.orders.inc(orders)
        for output in outputs:
            kind = ("expired" if output.window_expired else
                    "correction" if output.revision > 1 else "first")
            self.answers.labels(output.entity, kind).inc()
        for store, count in beyond.items():
            self.beyond.labels(store).inc(count)


def chosen_features(names: Sequence[str],
                    declared_features: Sequence[WindowedFeature] = WINDOWED_FEATURES
                    ) -> tuple[WindowedFeature, ...]:
    """The features named (all declared when none is). Raises ConfigurationError for a name
    that is not declared."""
    known = declared(declared_features)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigurationError(
            f"TRIAGE_WINDOWED_FEATURES (--features) names {', '.join(unknown)}, not declared; "
            f"the windowed features are {', '.join(known)} (model/windows.py)")
    return tuple(known[n] for n in names) if names else tuple(known.values())


def retention_ms(settings: WorkerSettings) -> int:
    """How far behind the latest order it answered a task keeps orders (event time, ms):
    TRIAGE_WINDOW_RETENTION_S."""
    return settings.windows.window_retention_s * 1000


class WindowStage:
    """One instance of the feature stage (module docstring). ``run`` until ``request_stop``;
    ``close`` leaves the group. Raises InfrastructureError (from the broker checks and the
    transactions) when the brokers will not serve it; the process then exits 1 and is
    restarted, resuming from the committed transactions; ConfigurationError (exit 2) when one
    of its topics does not exist (`triage topics create` makes them)."""

    def __init__(self, settings: WorkerSettings,
                 features: Sequence[WindowedFeature] | None = None,
                 worker_id: str = "0", metrics_addr: str = "0.0.0.0") -> None:
        self.settings, self.topics = settings, settings.topics
        self.features = tuple(features) if features is not None else chosen_features(
            settings.windows.names())
        self.stores = stores(self.features)
        self.retention_ms = retention_ms(settings)
        self.log = structlog.get_logger("window_stage")
        connection = settings.connection
        self.orders_codec = codec_for(connection, "order", self.topics.orders_topic)
        self.output_codec = codec_for(connection, "windowed_features",
                                      self.topics.windowed_features_topic)
        group = settings.windows.windows_group_id
        self.consumer = make_consumer(connection, group)
        check_brokers(self.consumer, connection)
        self.repartition = {repartition_topic(self.topics, e): e for e in self.stores}
        self.changelog = {e: changelog_topic(self.topics, e) for e in self.stores}
        partitions = require_topics(self.consumer, [self.topics.orders_topic, *self.repartition,
                                                    *self.changelog.values(),
                                                    self.topics.windowed_features_topic])
        self.producer = make_producer(
            connection, **{"transactional.id": transactional_id(group, worker_id),
                           "transaction.timeout.ms": settings.scorer.transaction_timeout_ms})
        self.committer = ExactlyOnce(self.producer, self.consumer, self.log,
                                     settings.scorer.delivery_timeout_ms / 1000.0)
        self.upstream = partitions[self.topics.orders_topic]
        self.store_partitions = {topic: partitions[topic] for topic in self.repartition}
        self.tasks: dict[tuple[str, int], WindowTask] = {}
        self._to_restore: set[tuple[str, int]] = set()
        self.read_max: dict[int, int] = {}  # orders partition -> latest order time, UTC ms
        self.quiet: dict[int, int] = {}  # orders partition -> quiet mark, UTC ms
        # orders partition -> (marks sent, monotonic time)
        self._sent: dict[int, tuple[tuple[int, int], float]] = {}
        self._committed_at_assign: dict[int, int] = {}
        self._stop = False
        self.counts = {"orders_read": 0, "orders_skipped": 0, "outputs": 0, "corrections": 0,
                       "restored": 0, "rewinds": 0}
        self.metrics = WindowMetrics(tuple(self.stores))
        self.health = Health(settings.scorer.health_stall_ms, ("group_joined",))
        self._turn: tuple[int, list[WindowOutput], dict[str, int]] = (0, [], {})
        self.consumer.subscribe([self.topics.orders_topic, *self.repartition],
                                on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        self._server = None  # last: nothing after it can fail and leave the port bound
        if settings.scorer.metrics_port:
            self._server = serve(settings.scorer.metrics_port, self.health,
                                 self.metrics.registry, addr=metrics_addr,
                                 setting="--metrics-port or TRIAGE_METRICS_PORT")
            self.log.info("metrics_serving", port=settings.scorer.metrics_port,
                          paths=["/metrics", "/healthz", "/readyz"])
        self.log.info("window_stage_started", group=group,
                      features=[f.name for f in self.features], stores=list(self.stores),
                      upstream_partitions=self.upstream, retention_ms=self.retention_ms)

    # --- the group -------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.health.met("group_joined")
        for tp in partitions:
            if tp.topic in self.repartition:
                self._to_restore.add((tp.topic, tp.partition))  # restored before it is read
            else:
                self.read_max.setdefault(tp.partition, MIN_MS)
        self.log.info("partitions_assigned", partitions=[f"{tp.topic}[{tp.partition}]"
                                                         for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.tasks.pop(key, None)
            self._to_restore.discard(key)
            if tp.topic == self.topics.orders_topic:
                self.read_max.pop(tp.partition, None)
                self.quiet.pop(tp.partition, None)
                self._sent.pop(tp.partition, None)
                self._committed_at_assign.pop(tp.partition, None)
        self.log.info("partitions_revoked", partitions=[f"{tp.topic}[{tp.partition}]"
                                                        for tp in partitions])

    def _restore(self) -> None:
        """Restore each newly assigned task from its changelog partition, read to its end."""
        for topic, partition in sorted(self._to_restore):
            entity = self.repartition[topic]
            started = time.monotonic()
            task = WindowTask(entity, self.stores[entity], self.upstream, self.retention_ms)
            records = read_changelog(self.settings, self.changelog[entity], partition,
                                     progress=self.health.beat)
            restored = task.restore(records)
            self.tasks[(topic, partition)] = task
            self.counts["restored"] += restored
            self.metrics.restore_seconds.observe(time.monotonic() - started)
            self.health.beat()  # a restore of many partitions is progress too
            self.log.info("store_restored", store=topic.removesuffix("-repartition"),
                          partition=partition, records=len(records), orders=restored,
                          frontier_ms=task.frontier,
                          seconds=round(time.monotonic() - started, 3))
        self._to_restore.clear()

    # --- the loop --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Return from :meth:`run` after the turn in hand (safe from a signal handler)."""
        self._stop = True

    def run(self, batch_size: int = 500, timeout_s: float = 0.1) -> None:
        """Consume, compute and publish, one transaction a turn, until stopped."""
        next_progress = time.monotonic() + _PROGRESS_S
        while not self._stop:
            self.turn(self.poll(batch_size, timeout_s))
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + _PROGRESS_S
                for entity in self.stores:
                    mine = [t for t in self.tasks.values() if t.entity == entity]
                    self.metrics.held.labels(entity).set(sum(map(len, mine)))
                    self.metrics.waiting.labels(entity).set(sum(t.waiting for t in mine))
                self.log.info("window_stage_progress", tasks=len(self.tasks),
                              orders_held=sum(len(t) for t in self.tasks.values()), **self.counts)

    def poll(self, batch_size: int = 500, timeout_s: float = 0.1) -> list[Message]:
        """Consume a batch (serving the group's callbacks), restore the tasks assigned since
        the last call, and return the batch's records."""
        batch = self.consumer.consume(batch_size, timeout_s)
        self.health.beat()  # a turn of the loop: /healthz stays live
        self._restore()
        return records_of(batch, self.log)

    def turn(self, records: list[Message]) -> None:
        """One transaction: forward the orders, apply the repartitioned records, send the
        marks that moved, publish the outputs and changelogs, commit the offsets."""
        offsets = self.produce_turn(records)
        if offsets is None:
            return
        try:
            self.committer.finish(offsets)
        except InfrastructureError as exc:
            cause = exc.__cause__
            error = cause.args[0] if isinstance(cause, KafkaException) else None
            if error is None or error.fatal() or not (error.code() in LOST_OWNERSHIP
                                                      or error.txn_requires_abort()):
                raise
            self.rewind(error.str())
            return
        orders, outputs, beyond = self._turn
        self.counts["orders_read"] += orders
        self.counts["outputs"] += len(outputs)
        self.counts["corrections"] += sum(o.revision > 1 for o in outputs)
        self.metrics.committed(orders, outputs, beyond)

    def produce_turn(self, records: list[Message]) -> list[TopicPartition] | None:
        """The turn up to its commit: open the transaction and produce into it. Returns the
        offsets to commit with it, None when there was nothing to do (no transaction)."""
        records = [msg for msg in records if self._owned(msg)]
        # Once a turn (it may ask the broker for ends): with records, after forwarding them.
        marks = None if records else self._due_marks()
        if not records and not marks:
            return None
        on_delivery = self.committer.begin()
        self._turn = (0, [], {})  # counted once the transaction commits (turn)
        outputs: list[WindowOutput] = []
        touched: set[tuple[str, int]] = set()
        for msg in records:
            topic, partition = msg.topic(), msg.partition()
            assert topic is not None and partition is not None
            if topic == self.topics.orders_topic:
                outputs.extend(self._forward(msg, partition, on_delivery))
            else:
                touched.add((topic, partition))
                outputs.extend(self._apply(self.tasks[(topic, partition)], msg))
        for upstream, mark in (self._due_marks() if marks is None else marks).items():
            headers = [(UPSTREAM_HEADER, str(upstream).encode()),
                       (WATERMARK_HEADER, str(mark[0]).encode()),
                       (QUIET_HEADER, str(mark[1]).encode())]
            for topic, count in self.store_partitions.items():
                for p in range(count):
                    produce(self.producer, topic, value=b"", partition=p, headers=headers,
                            on_delivery=on_delivery)
            self._sent[upstream] = (mark, time.monotonic())
        self._turn = (self._turn[0], outputs, self._turn[2])
        for output in outputs:
            produce(self.producer, self.topics.windowed_features_topic,
                    key=output.order_id.encode(), value=self.output_codec.encode(output.record()),
                    on_delivery=on_delivery)
        for topic, partition in touched:
            task = self.tasks[(topic, partition)]
            for key, value in task.changes():
                produce(self.producer, self.changelog[task.entity], key=key, value=value,
                        partition=partition, on_delivery=on_delivery)
        return next_offsets(records)

    def rewind(self, error: str) -> None:
        """The turn's transaction was aborted, or must be: a rebalance overtook it (its
        offsets were refused for an old group generation), or an abortable error failed it.
        Read again from the committed offsets, with the tasks as their changelogs committed
        them, rather than exit (a scale-out rebalances every instance). What the turn
        produced is delivered before the abort: aborting records still queued leaves a gap in
        the idempotent producer's sequence that fails the next transaction."""
        if self.committer.open:
            self.producer.flush(_FLUSH_BEFORE_ABORT_S)
        self.committer.abort_open()
        owned = self.consumer.assignment()
        for tp in self.consumer.committed(owned, timeout=10.0):
            self.consumer.seek(TopicPartition(tp.topic, tp.partition,
                                              tp.offset if tp.offset >= 0 else OFFSET_BEGINNING))
        self._to_restore |= set(self.tasks)
        self.tasks.clear()
        # The marks went with the aborted transaction, and they spoke for orders read in it:
        # they start again from what is read again (the tasks keep the committed ones).
        for partition in self.read_max:
            self.read_max[partition] = MIN_MS
        self.quiet.clear()
        self._sent.clear()
        self._committed_at_assign.clear()
        self.counts["rewinds"] += 1
        self.metrics.rewinds.inc()
        self.log.info("turn_rewound", error=error, partitions=len(owned),
                      note="the transaction was aborted; its records are read again")

    def _forward(self, msg: Message, partition: int, on_delivery: Any) -> list[WindowOutput]:
        """Send an order on to each store, keyed by its entity; answer those with no entity."""
        try:
            order = self.orders_codec.decode(msg.value())
        except BadRecord:
            self.counts["orders_skipped"] += 1
            return []
        self._turn = (self._turn[0] + 1, *self._turn[1:])
        now_ms = int(time.time() * 1000)
        time_ms = int(order["timestamp_ms"])
        self.read_max[partition] = max(self.read_max.get(partition, MIN_MS),
                                       min(time_ms, now_ms + self.settings.reference
                                           .max_clock_skew_ms))
        outputs = []
        headers = [(UPSTREAM_HEADER, str(partition).encode())]
        published = msg.timestamp()[1]
        for topic, entity in self.repartition.items():
            value = order.get(entity) or ""
            if value:
                produce(self.producer, topic, key=value.encode(), value=msg.value(),
                        headers=headers, timestamp=published, on_delivery=on_delivery)
            else:
                outputs.append(missing_output(order, entity, self.stores[entity]))
        return outputs

    def _apply(self, task: WindowTask, msg: Message) -> list[WindowOutput]:
        headers = {header[0]: int(header[1] or b"0") for header in msg.headers() or ()}
        if WATERMARK_HEADER in headers:
            return task.advance(headers[UPSTREAM_HEADER], headers[WATERMARK_HEADER],
                                headers[QUIET_HEADER])
        beyond = task.beyond_retention
        outputs = task.add(self.orders_codec.decode(msg.value()), msg.timestamp()[1])
        if task.beyond_retention > beyond:
            counts = self._turn[2]
            counts[task.entity] = counts.get(task.entity, 0) + task.beyond_retention - beyond
        return outputs

    def _owned(self, msg: Message) -> bool:
        """Whether a consumed record is of a partition this instance holds (a record fetched
        before its partition was revoked is left to the new owner: not applied, not
        committed)."""
        if msg.topic() == self.topics.orders_topic:
            return msg.partition() in self.read_max
        return (msg.topic(), msg.partition()) in self.tasks

    def _due_marks(self) -> dict[int, tuple[int, int]]:
        """Orders partitions whose marks moved and were not sent in the last
        ``_MARK_EVERY_S``: partition -> (latest order time read, quiet mark), UTC ms."""
        now = time.monotonic()
        waited = [p for p in self.read_max if now - self._sent.get(p, (None, 0.0))[1]
                  >= _MARK_EVERY_S]
        if not waited:
            return {}
        clock_ms = int(time.time() * 1000)  # before the broker is asked: what it says is later
        quiet_ms = clock_ms - self.settings.reference.reference_lateness_ms
        for partition in self._at_end(waited):
            self.quiet[partition] = max(self.quiet.get(partition, MIN_MS), quiet_ms)
        due = {}
        for partition in waited:
            marks = (self.read_max[partition], self.quiet.get(partition, MIN_MS))
            if marks != self._sent.get(partition, ((MIN_MS, MIN_MS), 0.0))[0]:
                due[partition] = marks
        return due

    def _at_end(self, partitions: list[int]) -> set[int]:
        """Those of ``partitions`` (of the orders topic, this instance's) with nothing left to
        read: the position is at the end offset the broker gives now (ListOffsets), and at
        the high watermark of the latest fetch. The broker is asked because a fetch's figure
        can be old (fetching stops for a rebalance): a quiet claim from it would answer orders
        before the ones published meanwhile were read."""
        owned = [TopicPartition(self.topics.orders_topic, p) for p in partitions]
        positions = self.consumer.position(owned)
        # A partition with nothing read since its assignment has no position: its committed
        # offset stands for it (asked once), or its beginning when it has none.
        unknown = [TopicPartition(tp.topic, tp.partition) for tp in positions
                   if tp.offset < 0 and tp.partition not in self._committed_at_assign]
        if unknown:
            with contextlib.suppress(KafkaException):
                for tp in self.consumer.committed(unknown, timeout=5.0):
                    self._committed_at_assign[tp.partition] = tp.offset
        found = set()
        for tp in positions:
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            offset = tp.offset
            if offset < 0:
                committed = self._committed_at_assign.get(tp.partition, -1)
                offset = committed if committed >= 0 else low
            if high < 0 or offset < high:
                continue
            try:
                _, end = self.consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
            except KafkaException:
                continue  # not known: not quiet
            if offset >= end:
                found.add(tp.partition)
        return found

    def close(self) -> None:
        """Abort the open transaction if any, leave the group."""
        try:
            self.committer.abort_open()
            self.consumer.close()
        finally:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
        self.log.info("window_stage_stopped", **self.counts)


def read_changelog(settings: WorkerSettings, topic: str, partition: int,
                   timeout_s: float = 60.0, progress: Callable[[], None] | None = None
                   ) -> list[tuple[bytes | None, bytes | None]]:
    """Every committed record of one changelog partition, from its beginning to its end, as
    (key, value). The end is the high watermark at the call, read ``read_committed``: a
    transaction committed by the partition's previous owner whose commit marker has not
    reached the partition yet (the coordinator writes the markers after EndTxn answers) is
    waited for, not cut off, and so is one a killed owner left open, until the coordinator
    aborts it (TRIAGE_TRANSACTION_TIMEOUT_MS), as the committed offsets are (KIP-447).
    ``progress`` is called after each fetch (a health beat). Raises InfrastructureError if the
    end is not reached within ``timeout_s``."""
    group = settings.windows.windows_group_id + "-restore"
    ends = make_consumer(settings.connection, group, **{"isolation.level": "read_uncommitted"})
    try:
        low, high = ends.get_watermark_offsets(TopicPartition(topic, partition), timeout=10.0)
    finally:
        ends.close()
    if high <= low:
        return []
    consumer = make_consumer(settings.connection, group, **{"enable.partition.eof": True})
    try:
        consumer.assign([TopicPartition(topic, partition, low)])
        records: list[tuple[bytes | None, bytes | None]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.05):
                error = msg.error()
                if error is None:
                    records.append((msg.key(), msg.value()))
                elif error.code() == KafkaError._PARTITION_EOF and (msg.offset() or 0) >= high:
                    return records
            if progress is not None:
                progress()
        raise InfrastructureError(f"{topic}[{partition}] not read to its end ({high}) within "
                                  f"{timeout_s:.0f} s ({len(records)} records read): an open "
                                  "transaction on it did not end")
    finally:
        consumer.close()
