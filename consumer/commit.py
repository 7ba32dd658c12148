"""How a worker makes a batch's outputs and its consumed offsets final.

* :class:`AtLeastOnce`: wait until the broker acknowledged every record the batch produced,
  then commit the consumed offsets. A crash between the two re-reads the batch, so a prediction
  can be published twice (identical, keyed by ``order_id``), never lost. The drift monitor's.
* :class:`PipelinedAtLeastOnce` (the scorer's default): the same rule, without stopping the
  loop for the acknowledgements: a batch's offsets are committed once every record it produced
  is acknowledged, checked on each turn of the loop, in batch order; at most
  ``MAX_UNCOMMITTED_BATCHES`` (2) batches are produced and not yet committed at any time, so a
  crash re-reads at most two batches. The loop's turn no longer waits for the acknowledgements
  (acks=all) before consuming again; the commit itself stays a synchronous round trip, on the
  turns that complete a batch.
* :class:`ExactlyOnce` (``--exactly-once``): one Kafka transaction per batch, holding the
  predictions, drift samples, dead letters and the consumed offsets (sent with the consumer
  group's metadata, so a fenced zombie cannot commit). Readers with ``read_committed`` see each
  batch once or not at all. Needs a broker with working transactions (Apache Kafka; see the
  docs/operating.md on the embedded broker).

All raise :class:`InfrastructureError` when the broker will not take the batch; the worker then
exits non-zero, its supervisor restarts it, and it resumes from the last committed offsets.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from triage.bus.clients import source_of
from triage.bus.errors import InfrastructureError

_FLUSH_TIMEOUT_S = 60.0  # TRIAGE_DELIVERY_TIMEOUT_MS's default
DeliveryCallback = Callable[[KafkaError | None, Message], None]
MAX_UNCOMMITTED_BATCHES = 2  # PipelinedAtLeastOnce: produced, not yet committed (with the open one)
_ATTEMPTS = 5
_PURGED = {KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT}
# A rebalance overtook the commit. With cooperative rebalancing our partitions are revoked only
# through our own callback, inside a later consume(), so they are still ours: retry once the
# group has its new generation. Giving up here would hand the batch to the next owner again.
_REBALANCING = {KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION}
# Commit errors that mean "these partitions are no longer yours": the new owner re-reads them.
LOST_OWNERSHIP = _REBALANCING | {KafkaError.UNKNOWN_MEMBER_ID, KafkaError._ASSIGNMENT_LOST,
                                  KafkaError.FENCED_INSTANCE_ID}


def next_offsets(consumed: list[Message]) -> list[TopicPartition]:
    """The offsets to commit after ``consumed``: per partition, the highest offset + 1."""
    highest: dict[tuple[str, int], int] = {}
    for msg in consumed:
        source = source_of(msg)
        key = (source.topic, source.partition)
        highest[key] = max(highest.get(key, -1), source.offset)
    return [TopicPartition(t, p, o + 1) for (t, p), o in highest.items()]


def transactional_id(group_id: str, worker_id: str, instance_id: str = "") -> str:
    """With a static instance id, the same id for the same worker across restarts: the
    restarted worker's init_transactions aborts what the killed one left open at once (and
    fences it). Without one, unique per process: fencing of zombies comes from the group
    metadata (KIP-447), and two supervisors of one group on one host must not share an id
    and fence each other; a killed worker's open transaction then ends after
    TRIAGE_TRANSACTION_TIMEOUT_MS."""
    if instance_id:
        return f"{group_id}-{instance_id}-{worker_id}"
    return f"{group_id}-{socket.gethostname()}-{worker_id}-{time.time_ns()}"


class AtLeastOnce:
    """``flush_timeout_s``: how long :meth:`finish` waits for the broker's acknowledgements
    (and, in :class:`ExactlyOnce`, for each attempt to commit a transaction)."""

    transactional = False

    def __init__(self, producer: Producer, consumer: Consumer, log: Any,
                 flush_timeout_s: float = _FLUSH_TIMEOUT_S) -> None:
        self.producer, self.consumer, self.log = producer, consumer, log
        self.flush_timeout_s = flush_timeout_s
        self._errors: list[str] = []

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err.str()}")

    def begin(self) -> DeliveryCallback:
        """Open a batch; returns the delivery report callback for its records (here: only
        failures matter, :meth:`finish` flushes)."""
        return self.on_delivery

    def abort_open(self) -> None:
        """Nothing to abort: what was produced stays, and is read again after a restart."""

    def settle(self) -> None:
        """Commit what has become final since the last call (nothing here: :meth:`finish`
        commits); called on every turn of the loop."""

    def drain(self) -> None:
        """Make every finished batch final now (nothing left here after :meth:`finish`)."""

    def finish(self, offsets: list[TopicPartition], produced: int = 0) -> None:
        """Wait for every delivery, then commit ``offsets`` (the next offset to read).
        ``produced``: records the batch produced (counted by the pipelined committer)."""
        remaining = self.producer.flush(self.flush_timeout_s)
        errors, self._errors = self._errors, []
        if remaining or errors:
            raise InfrastructureError(
                f"{len(errors)} record(s) refused and {remaining} not acknowledged within "
                f"{self.flush_timeout_s:.0f} s; not committing"
                + (f"; first error: {errors[0]}" if errors else ""))
        if offsets:
            self._commit(offsets)

    def _commit(self, offsets: list[TopicPartition]) -> None:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
                return
            except KafkaException as exc:
                err = exc.args[0]
                last = attempt == _ATTEMPTS
                if err.code() in _REBALANCING and not last:
                    self.log.info("commit_retry_during_rebalance", error=err.str(),
                                  attempt=attempt)
                elif err.code() in LOST_OWNERSHIP:
                    self.log.warning("commit_rejected_after_rebalance", error=err.str(),
                                     note="the partitions' new owner re-reads this batch")
                    return
                elif not err.retriable() or last:
                    raise InfrastructureError(f"commit failed: {err.str()}") from exc
                time.sleep(0.2 * 2**attempt)  # back off: transient failure or rebalance


class _Batch:
    """A finished batch of :class:`PipelinedAtLeastOnce`: its offsets wait for its records'
    acknowledgements."""

    __slots__ = ("acknowledged", "finished_at", "offsets", "produced")

    def __init__(self) -> None:
        self.produced = -1  # unknown until finish()
        self.acknowledged = 0
        self.offsets: list[TopicPartition] = []
        self.finished_at = 0.0

    @property
    def complete(self) -> bool:
        return self.acknowledged >= self.produced >= 0


class PipelinedAtLeastOnce(AtLeastOnce):
    """At-least-once without a stop per batch (module docstring). Needs delivery reports of
    every record (the producer must not set ``delivery.report.only.error``): they count the
    acknowledgements of each batch. Raises InfrastructureError, from :meth:`settle`,
    :meth:`finish` or :meth:`drain`, when the broker refused a record or has not acknowledged
    a batch within ``flush_timeout_s``; nothing after that batch is committed."""

    def __init__(self, producer: Producer, consumer: Consumer, log: Any,
                 flush_timeout_s: float = _FLUSH_TIMEOUT_S) -> None:
        super().__init__(producer, consumer, log, flush_timeout_s)
        self._open = _Batch()
        self._waiting: deque[_Batch] = deque()

    def begin(self) -> DeliveryCallback:
        """Open a batch; returns the callback that counts its records' acknowledgements (the
        only way a batch completes: produce its records with this one)."""
        self._open = batch = _Batch()
        errors = self._errors

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(f"{msg.topic()}: {err.str()}")
            else:
                batch.acknowledged += 1
        return delivered

    def finish(self, offsets: list[TopicPartition], produced: int = 0) -> None:
        """Queue the batch's ``offsets`` behind its ``produced`` records' acknowledgements;
        commit what is final; wait (serving delivery reports) while the batches not yet
        committed number ``MAX_UNCOMMITTED_BATCHES``, so that the next one stays in the bound."""
        batch, self._open = self._open, _Batch()
        batch.produced, batch.offsets, batch.finished_at = produced, offsets, time.monotonic()
        self._waiting.append(batch)
        self.settle()
        while len(self._waiting) >= MAX_UNCOMMITTED_BATCHES:
            self.producer.poll(0.005)
            self.settle()

    def settle(self) -> None:
        self.producer.poll(0)  # serves the delivery reports in this thread
        if self._errors:  # the same list the callbacks hold: emptied, not replaced
            errors = list(self._errors)
            self._errors.clear()
            raise InfrastructureError(f"{len(errors)} record(s) refused; not committing "
                                      f"this batch or any after it; first error: {errors[0]}")
        final: dict[tuple[str, int], int] = {}
        while self._waiting and self._waiting[0].complete:
            for tp in self._waiting.popleft().offsets:
                key = (tp.topic, tp.partition)
                final[key] = max(final.get(key, -1), tp.offset)
        if self._waiting and (time.monotonic() - self._waiting[0].finished_at
                              > self.flush_timeout_s):
            raise InfrastructureError(
                f"a batch's records were not acknowledged within {self.flush_timeout_s:.0f} s; "
                "not committing it or any after it")
        if final:
            self._commit([TopicPartition(t, p, o) for (t, p), o in final.items()])

    def drain(self) -> None:
        """Wait for every acknowledgement (up to ``flush_timeout_s``), then commit every
        finished batch."""
        if not self._waiting:  # records produced outside a batch are close()'s to flush
            return
        # Within the oldest batch's own allowance, not a fresh one: a stop or a rebalance
        # waits at most TRIAGE_DELIVERY_TIMEOUT_MS from when that batch was finished.
        oldest = self._waiting[0].finished_at
        self.producer.flush(max(0.0, oldest + self.flush_timeout_s - time.monotonic()))
        self.settle()
        if self._waiting:
            raise InfrastructureError(
                f"{len(self._waiting)} batch(es) not acknowledged within "
                f"{self.flush_timeout_s:.0f} s; not committed")


class ExactlyOnce(AtLeastOnce):
    transactional = True

    def __init__(self, producer: Producer, consumer: Consumer, log: Any,
                 flush_timeout_s: float = _FLUSH_TIMEOUT_S) -> None:
        super().__init__(producer, consumer, log, flush_timeout_s)
        producer.init_transactions(30.0)
        self.open = False

    def begin(self) -> DeliveryCallback:
        self.producer.begin_transaction()
        self.open = True
        return self.on_delivery

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        """A record purged by an abort is no failure of the transaction in hand: its report
        can come after the next one began (the feature stage aborts and goes on), and the
        aborted batch is read again."""
        if err is not None and err.code() in _PURGED:
            return
        super().on_delivery(err, msg)

    def abort_open(self) -> None:
        """Abort a transaction a failure left open, so read_committed readers move on now
        rather than after transaction.timeout.ms."""
        if self.open:
            self.open = False
            with contextlib.suppress(KafkaException):
                self.producer.abort_transaction(10.0)

    def finish(self, offsets: list[TopicPartition], produced: int = 0) -> None:
        try:
            if offsets:
                self.producer.send_offsets_to_transaction(
                    offsets, self.consumer.consumer_group_metadata(), 30.0)
            self._commit_transaction()
            self.open = False
        except KafkaException as exc:
            err = exc.args[0]
            if err.txn_requires_abort():
                self.abort_open()
            raise InfrastructureError(f"transaction failed: {err.str()}; aborted, the batch "
                                      "will be read again") from exc
        if self._errors:  # a refused record makes commit_transaction fail; this is a backstop
            errors, self._errors = self._errors, []
            raise InfrastructureError(f"{len(errors)} record(s) refused: {errors[0]}")

    def _commit_transaction(self) -> None:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                self.producer.commit_transaction(self.flush_timeout_s)
                return
            except KafkaException as exc:
                if not exc.args[0].retriable() or attempt == _ATTEMPTS:
                    raise
                time.sleep(0.2 * 2**attempt)
