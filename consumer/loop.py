"""The Kafka side of a worker: consume a batch, hand it on, produce what comes back, commit.

:class:`BatchLoop` is the one consume-transform-produce loop of the project. The scorer runs
it with the scoring core (:mod:`triage.consumer.scorer`), the benchmark's comparison workers
with theirs (:mod:`triage.bench.workers`), so every figure compares the same Kafka policy:

* wait for the first record only (``TRIAGE_BATCH_TIMEOUT_MS``); the batch is whatever is
  fetched by then, up to ``TRIAGE_BATCH_SIZE``, so a lone order goes at once and a backlog in
  bulk;
* hand the records to the handler, which returns the records to produce (:class:`Output`) and
  the offsets it has settled (all of the batch, for a plain function; up to the first order
  still waiting for reference data, for the scorer);
* produce them, and commit those offsets once the broker acknowledged every one
  (:mod:`triage.consumer.commit`): at-least-once, checked on every turn without waiting for
  the acknowledgements (at most two batches produced and not committed), or one transaction
  per batch. A crash before the commit means the records are read again;
* never poll in the middle of a batch: revocation happens only inside ``consume()``, whose
  callback first makes every finished batch final; records of a partition revoked by the
  second ``consume()`` of a batch are dropped unhandled, for the new owner to read.

Infrastructure failures (a delivery refused, a commit that cannot be made) raise
:class:`~triage.bus.errors.InfrastructureError`; the process exits 1 and is restarted.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from triage.bus.clients import (
    make_admin,
    make_consumer,
    make_producer,
    partitions_of,
    produce,
    produce_batch,
    records_of,
)
from triage.bus.health import Health
from triage.bus.offsets import group_lag
from triage.bus.settings import ConnectionSettings
from triage.consumer import metrics
from triage.consumer.commit import (
    AtLeastOnce,
    ExactlyOnce,
    PipelinedAtLeastOnce,
    next_offsets,
    transactional_id,
)
from triage.consumer.groupwatch import GroupWatch
from triage.consumer.settings import ScorerSettings

Headers = list[tuple[str, bytes]]


class Output(NamedTuple):
    """A record to produce; ``partition`` -1: the one the partitioner gives its key."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers | None = None
    partition: int = -1


Handler = Callable[[list[Message]], Sequence[Output]]


@dataclass
class Handled:
    """What the loop does after a batch: produce ``outputs``, then commit ``commit`` (the next
    offset to read, per partition), and pause or resume partitions of its topic."""

    outputs: Sequence[Output] = ()
    commit: list[TopicPartition] = field(default_factory=list)
    pause: Sequence[int] = ()
    resume: Sequence[int] = ()


class BatchHandler(Protocol):
    """What a loop hands its batches to. ``pending()``: it has work that needs no new record
    (orders waiting for reference data), so the loop calls ``handle([])`` on idle turns."""

    def handle(self, records: list[Message]) -> Handled: ...

    def pending(self) -> bool: ...

    def on_assigned(self, partitions: list[int]) -> None: ...

    def on_revoked(self, partitions: list[int]) -> None: ...


class PerBatch:
    """A handler of plain functions: every record of a batch is settled by it, so the loop
    commits the batch's offsets (the benchmark's comparison workers)."""

    def __init__(self, handle: Handler) -> None:
        self.function = handle

    def handle(self, records: list[Message]) -> Handled:
        return Handled(self.function(records), next_offsets(records))

    def pending(self) -> bool:
        return False

    def on_assigned(self, partitions: list[int]) -> None:
        pass

    def on_revoked(self, partitions: list[int]) -> None:
        pass


class BatchLoop:
    """Consume ``topic`` in the consumer group ``scorer.group_id`` until :meth:`request_stop`,
    in batches as ``scorer`` says (size, timeout, exactly once or not).

    ``status_file``: where the worker's owned partitions, lag and count of consumed records are
    kept for the supervisor (JSON, rewritten at most once a second and on every rebalance).
    ``progress``: called every 10 s for a log line of the caller's counts. ``status``: more
    fields for the status file (the scorer's reference tables and waiting orders). ``health``:
    beaten on every turn of the loop (a batch or an idle poll), its ``group_joined`` condition
    met on the first assignment, even of no partition (bus/health.py). ``consumer`` and
    ``producer``: the Kafka clients, made from ``connection`` when not given (a test gives
    doubles of them, tests/unit/doubles.py); a producer given for ``scorer.exactly_once`` must
    be transactional.
    """

    def __init__(self, connection: ConnectionSettings, scorer: ScorerSettings, topic: str, *,
                 worker_id: str = "0",
                 status_file: Path | None = None, log: Any = None,
                 progress: Callable[[], dict[str, object]] | None = None,
                 status: Callable[[], dict[str, object]] | None = None,
                 health: Health | None = None, consumer: Consumer | None = None,
                 producer: Producer | None = None) -> None:
        self.scorer = scorer
        self.health = health
        self.topic = topic
        self.worker_id = worker_id
        self.status_file = status_file
        self.log = log or structlog.get_logger("loop").bind(worker=worker_id)
        self.progress = progress
        self.status = status
        member = {"group.instance.id": f"{scorer.instance_id}-{worker_id}"} \
            if scorer.instance_id else {}
        self.connection = connection
        self.consumer = consumer if consumer is not None else make_consumer(
            connection, scorer.group_id, **member)
        self.assigned: set[int] = set()
        self.handler: BatchHandler = PerBatch(lambda records: [])  # until run() is given one
        self._subscribed = False
        self._closed = False
        # monotonic seconds of subscribe(), until the first assignment: the group join
        self._subscribed_at: float | None = None
        self._lag_series: set[int] = set()  # partitions with a triage_consumer_lag_records series
        self.consumed = 0
        self._stop_requested = False
        self._revoked_now: set[int] = set()
        self._committed_at_assign: dict[int, int] = {}  # see partition_lag()
        self._failed = False  # run() is leaving on an error: rebalance callbacks commit nothing
        if scorer.exactly_once:
            # A transaction commits once every record is acknowledged: only failed deliveries
            # need a Python callback.
            self.producer = producer if producer is not None else make_producer(connection, **{
                "delivery.report.only.error": True,
                "transaction.timeout.ms": scorer.transaction_timeout_ms,
                "transactional.id": transactional_id(scorer.group_id, worker_id,
                                                     scorer.instance_id)})
            self.committer: AtLeastOnce = ExactlyOnce(self.producer, self.consumer, self.log,
                                                      scorer.delivery_timeout_ms / 1000.0)
        else:  # every delivery report counts towards its batch's commit (consumer/commit.py)
            self.producer = producer if producer is not None else make_producer(connection)
            self.committer = PipelinedAtLeastOnce(self.producer, self.consumer, self.log,
                                                  scorer.delivery_timeout_ms / 1000.0)

    def request_stop(self) -> None:
        """Finish the batch in hand, commit it, leave the group (safe from a signal handler)."""
        self._stop_requested = True

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def subscribe(self) -> None:
        """Start joining the consumer group now, if :meth:`run` has not: librdkafka runs the
        join (seconds for a new group: the broker's initial rebalance delay, 3 s by default
        on Apache Kafka and tansu alike) in its own thread while the caller loads its model
        and tables, and the assignment reaches the handler at run()'s first poll. Nothing is
        fetched before then. A start-up longer than ``max.poll.interval.ms`` costs one more
        rebalance (librdkafka leaves the group, and run() joins again), never a record."""
        if self._subscribed:
            return
        self._subscribed, self._subscribed_at = True, time.monotonic()
        self.consumer.subscribe([self.topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        self.log.info("group_join_started", group=self.scorer.group_id, topic=self.topic)

    def close(self) -> None:
        """Leave the group (if joined) and release the clients; run() does it on the way out,
        and a caller that made the loop and could not run it calls it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.consumer.close()
        self.producer.flush(10.0)

    def run(self, handler: BatchHandler | Handler) -> None:
        """Loop until stopped; leaves the group on the way out, so partitions move at once.
        ``handler``: a :class:`BatchHandler`, or a function of a batch to its outputs."""
        self.handler = handler if not callable(handler) else PerBatch(handler)
        self.subscribe()
        timeout_s = self.scorer.batch_timeout_ms / 1000.0
        batch_size = self.scorer.batch_size
        last_report = last_status = time.monotonic()
        beat = self.health.beat if self.health is not None else lambda: None
        watch = GroupWatch(self.scorer.group_id, self.topic,
                           2 * self.connection.session_timeout_ms, self._describe_group,
                           self._group_progress, self.log, background=True)
        try:
            while not self._stop_requested:
                self._revoked_now.clear()
                batch = self.consumer.consume(1, timeout_s)
                if batch and batch_size > 1:
                    batch += self.consumer.consume(batch_size - 1, 0)
                if self._revoked_now:  # revoked by the second consume(): no longer ours
                    batch = [m for m in batch if m.partition() not in self._revoked_now]
                if batch or self.handler.pending():
                    self._process(batch)
                self.committer.settle()  # offsets of batches the broker has acknowledged
                beat()
                watch.tick(self.assigned)
                now = time.monotonic()
                if now - last_status >= 1.0:
                    self._write_status()
                    last_status = now
                if self.progress is not None and now - last_report >= 10.0:
                    self.log.info("progress", **self.progress())
                    last_report = now
            self.committer.drain()  # a requested stop: everything finished is committed
        except BaseException:
            # Leaving on an error: nothing more is waited for (the broker may be the error);
            # what is not committed is read again after the restart.
            self._failed = True
            raise
        finally:
            self.committer.abort_open()  # an unfinished transaction must not block readers
            self.close()

    def _describe_group(self) -> tuple[Any, list[int]]:
        """The group's description (DescribeConsumerGroups) and the topic's partition numbers,
        for the :class:`GroupWatch`. Raises KafkaException if the broker does not answer."""
        admin = make_admin(self.connection)  # from the watch's thread: none of the loop's
        future = admin.describe_consumer_groups([self.scorer.group_id],
                                                request_timeout=5.0)[self.scorer.group_id]
        description = future.result(timeout=10.0)
        return description, [tp.partition for tp in partitions_of(admin, self.topic)]

    def _group_progress(self) -> dict[int, tuple[int | None, int]]:
        """Per partition of the topic: the group's committed offset (None if none) and the
        end offset, for the :class:`GroupWatch`."""
        return {row.partition: (row.committed, row.end)
                for row in group_lag(self.connection, self.scorer.group_id, self.topic)}

    def _drain_unless_failed(self) -> None:
        if not self._failed:
            self.committer.drain()

    def _process(self, batch: list[Message]) -> None:
        started = time.perf_counter()
        records = records_of(batch, self.log)
        handled = self.handler.handle(records)
        self.consumed += len(records)
        if handled.outputs or handled.commit:
            on_delivery = self.committer.begin()
            self._produce(handled.outputs, on_delivery)
            self.committer.finish(handled.commit, len(handled.outputs))
        if handled.pause:
            self.consumer.pause([TopicPartition(self.topic, p) for p in handled.pause])
            self.log.info("partitions_paused", partitions=sorted(handled.pause),
                          note="too many orders wait for reference data")
        if handled.resume:
            self.consumer.resume([TopicPartition(self.topic, p) for p in handled.resume])
            self.log.info("partitions_resumed", partitions=sorted(handled.resume))
        if records:
            metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    def _produce(self, outputs: Sequence[Output],
                 on_delivery: Callable[[KafkaError | None, Message], None]) -> None:
        """Produce ``outputs`` in their order: each run of records to one partition of one
        topic (or all to the partitioner, -1) without headers in one ``produce_batch`` call,
        the others one by one (docs/benchmarks.md has what it saves)."""
        producer, i, n = self.producer, 0, len(outputs)
        while i < n:
            topic, key, value, headers, partition = outputs[i]
            if headers is not None:
                produce(producer, topic, key=key, value=value, headers=headers,
                        partition=partition, on_delivery=on_delivery)
                i += 1
                continue
            run = []
            while i < n:
                output = outputs[i]
                if output.topic != topic or output.partition != partition or \
                        output.headers is not None:
                    break
                run.append({"key": output.key, "value": output.value})
                i += 1
            produce_batch(producer, topic, run, partition, on_delivery)

    # -- group membership ------------------------------------------------------------------
    # Callbacks receive only the partitions that change (cooperative-sticky is incremental).

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {p.partition for p in partitions}
        if self.health is not None:
            self.health.met("group_joined")
        self.handler.on_assigned(sorted(p.partition for p in partitions))
        joined: dict[str, int] = {}
        if self._subscribed_at is not None:  # the first assignment: how long the join took
            joined["join_ms"] = round((time.monotonic() - self._subscribed_at) * 1000)
            self._subscribed_at = None
        self.log.info("partitions_assigned", partitions=sorted(p.partition for p in partitions),
                      now_owned=sorted(self.assigned), **joined)
        self._write_status(ask_broker=False)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Revocation happens inside consume(), between batches: every finished batch is made
        # final while the partitions are still ours, so nothing delivered is left uncommitted.
        self._drain_unless_failed()
        self.assigned -= {p.partition for p in partitions}
        self._revoked_now |= {p.partition for p in partitions}
        for p in partitions:
            self._committed_at_assign.pop(p.partition, None)
        self.handler.on_revoked(sorted(p.partition for p in partitions))
        self.log.info("partitions_revoked", partitions=sorted(p.partition for p in partitions),
                      now_owned=sorted(self.assigned))
        self._write_status(ask_broker=False)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Probably no longer ours (the session expired): commit what was delivered anyway. It
        # is at-least-once safe (the offsets cover only records whose outputs the broker has),
        # a group that moved on refuses it (logged), and one that has not is spared the
        # re-reads. What the old generation cannot commit, the new owner reads again.
        self._drain_unless_failed()
        self.assigned -= {p.partition for p in partitions}
        self._revoked_now |= {p.partition for p in partitions}
        for p in partitions:
            self._committed_at_assign.pop(p.partition, None)
        self.handler.on_revoked(sorted(p.partition for p in partitions))
        self.log.warning("partitions_lost", partitions=sorted(p.partition for p in partitions))
        self._write_status(ask_broker=False)

    def partition_lag(self, ask_broker: bool = True) -> dict[int, int | None]:
        """Records behind the end of each partition this worker owns, from the high watermarks
        of its own fetches (exact on any broker); None for a partition not fetched yet. A paused
        partition is not fetched, so its figure is as of the pause. ``ask_broker``: the
        committed offset of a partition with no position yet may be asked for (never inside a
        rebalance callback: a blocking call on the consumer there breaks confluent-kafka's
        state for the next callback of the same consume())."""
        if not self.assigned:
            return {}
        lags: dict[int, int | None] = {}
        positions = self.consumer.position([TopicPartition(self.topic, p)
                                            for p in self.assigned])
        # A partition assigned at its end has no position until a record arrives (none may
        # for a long time): its committed offset stands for it, asked of the broker once.
        unknown = [tp.partition for tp in positions
                   if tp.offset < 0 and tp.partition not in self._committed_at_assign]
        if unknown and ask_broker:
            with contextlib.suppress(KafkaException):
                for tp in self.consumer.committed(
                        [TopicPartition(self.topic, p) for p in unknown], timeout=5.0):
                    if tp.offset >= 0:
                        self._committed_at_assign[tp.partition] = tp.offset
        for tp in positions:
            offset = tp.offset if tp.offset >= 0 else self._committed_at_assign.get(
                tp.partition, -1)
            high = self.consumer.get_watermark_offsets(tp, cached=True)
            known = offset >= 0 and high is not None and high[1] >= 0
            lags[tp.partition] = max(0, high[1] - offset) if known and high else None
        return lags

    def lag(self) -> int | None:
        """Records behind the end of this worker's partitions, summed; None until every one of
        them has been fetched."""
        lags = self.partition_lag()
        return None if None in lags.values() else sum(v for v in lags.values() if v is not None)

    def _write_status(self, ask_broker: bool = True) -> None:
        """Publish partitions, lag and counts for the supervisor (readiness, autoscaling) and
        as metrics (a partition's lag series goes when the partition does)."""
        lags = self.partition_lag(ask_broker)
        metrics.OWNED_PARTITIONS.set(len(self.assigned))
        for partition in self._lag_series - self.assigned:
            metrics.LAG.remove(str(partition))
        self._lag_series &= self.assigned
        for partition, behind in lags.items():
            if behind is not None:
                metrics.LAG.labels(str(partition)).set(behind)
                self._lag_series.add(partition)
        lag = None if None in lags.values() else sum(v for v in lags.values() if v is not None)
        self.write_status(partitions=sorted(self.assigned), lag=lag,
                          consumed=self.consumed, **(self.status() if self.status else {}))

    def write_status(self, **fields: object) -> None:
        """Replace the status file with this process's pid and worker id, and ``fields``."""
        if self.status_file is None:
            return
        tmp = self.status_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"pid": os.getpid(), "worker": self.worker_id, **fields}))
            tmp.replace(self.status_file)
        except FileNotFoundError:  # the supervisor is gone and its directory with it: the
            pass  # status is for it alone, and the worker stops on its own (worker.py)
