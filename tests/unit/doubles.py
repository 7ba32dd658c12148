"""In-memory doubles of confluent_kafka's Consumer and Producer, for the batch loop
(consumer/loop.py) and its commit strategies (consumer/commit.py) without a broker. They
implement only what those two call, and behave as the client does where the loop relies on it:

* group membership runs inside ``consume()``: every partition is assigned in the first call (as
  librdkafka calls ``on_assign`` from a poll), and a test revokes partitions inside a later call
  of its choice (:meth:`FakeConsumer.revoke_in`), before that call returns records;
* the broker answers a produced record only while the client waits for it: ``poll()`` with a
  timeout, ``flush()``, ``commit_transaction()``; ``poll(0)`` serves only the reports already
  back. :meth:`FakeProducer.hold` keeps every answer back (a broker that does not answer: a
  wait then ends as its timeout would, at once), and ``refuse`` fails the records it matches;
* a transaction's records and offsets count only once it is committed.

Nothing sleeps: where the client would wait out a timeout, the double answers at once with what
the timeout would leave.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, KafkaException, TopicPartition

NO_OFFSET = -1001  # librdkafka's OFFSET_INVALID: no position, no committed offset


class Record:
    """A record as the consumer returns it and a delivery report carries it (the methods of
    confluent_kafka.Message that the loop calls)."""

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None,
                 value: bytes | None, headers: list[tuple[str, bytes]] | None = None,
                 timestamp_ms: int = 1_700_000_000_000) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._key, self._value, self._headers = key, value, headers
        self._timestamp_ms = timestamp_ms

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_CREATE_TIME, self._timestamp_ms

    def error(self) -> KafkaError | None:
        return None

    def __repr__(self) -> str:
        return f"Record({self._topic}/{self._partition}@{self._offset})"


class FakeConsumer:
    """A member of a consumer group on one topic whose partitions hold ``records[p]`` records
    each (values ``b"<p>:<offset>"``). ``consume()`` returns the records at the positions of the
    partitions owned and not paused, lowest offset first (partitions interleaved). ``on_idle``
    is called when a consume() finds nothing left to return (a test stops the loop there)."""

    def __init__(self, topic: str, records: dict[int, int],
                 on_idle: Callable[[], None] | None = None) -> None:
        self.topic = topic
        self.log = {p: [Record(topic, p, o, f"k{p}:{o}".encode(), f"{p}:{o}".encode())
                        for o in range(n)] for p, n in records.items()}
        self.on_idle = on_idle
        self.assigned: set[int] = set()
        self.paused: set[int] = set()
        self.positions: dict[int, int] = {}
        self.committed_offsets: dict[int, int] = {}
        self.commits: list[dict[int, int]] = []  # each commit(): partition -> next offset
        self.commit_errors: list[KafkaException] = []  # raised by the next commit()s
        self.on_commit: Callable[[dict[int, int]], None] | None = None  # sees each commit
        self.consume_calls = 0
        self.group_metadata = object()  # what consumer_group_metadata() hands transactions
        self.closed = False
        self._actions: dict[int, list[Callable[[], None]]] = {}
        self._callbacks: dict[str, Callable[..., None] | None] = {}
        self._empty_in_a_row = 0

    # -- what the test drives ----------------------------------------------------------------

    def at_consume(self, call: int, action: Callable[[], None]) -> None:
        """Run ``action`` inside the ``call``-th consume() (1-based), before it returns records:
        where librdkafka runs rebalance callbacks."""
        self._actions.setdefault(call, []).append(action)

    def revoke_in(self, call: int, partitions: list[int]) -> None:
        """Revoke ``partitions`` inside the ``call``-th consume() (a cooperative rebalance)."""
        self.at_consume(call, lambda: self._take_away(partitions, "on_revoke"))

    # -- the client's interface --------------------------------------------------------------

    def subscribe(self, topics: list[str], on_assign: Callable[..., None] | None = None,
                  on_revoke: Callable[..., None] | None = None,
                  on_lost: Callable[..., None] | None = None) -> None:
        assert topics == [self.topic], topics
        self._callbacks = {"on_assign": on_assign, "on_revoke": on_revoke, "on_lost": on_lost}

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Record]:
        assert self._callbacks, "consume() before subscribe()"
        assert not self.closed, "consume() after close()"
        self.consume_calls += 1
        if self.consume_calls == 1:
            self._assign(sorted(self.log))
        for action in self._actions.pop(self.consume_calls, []):
            action()
        fetchable = sorted(self.assigned - self.paused)
        ready = sorted((o, p) for p in fetchable for o in range(self.positions[p],
                                                                  len(self.log[p])))
        batch = [self.log[p][o] for o, p in ready[:num_messages]]
        for record in batch:
            self.positions[record.partition()] = record.offset() + 1
        if batch:
            self._empty_in_a_row = 0
        else:
            self._empty_in_a_row += 1
            assert self._empty_in_a_row < 1_000, "the loop spins on a consumer with nothing left"
            if self.on_idle is not None and not self._actions:
                self.on_idle()
        return batch

    def commit(self, message: Any = None, offsets: list[TopicPartition] | None = None,
               asynchronous: bool = True) -> None:
        assert offsets is not None and not asynchronous, "the loop commits offsets, synchronously"
        if self.commit_errors:
            raise self.commit_errors.pop(0)
        committed = {tp.partition: tp.offset for tp in offsets}
        assert {tp.topic for tp in offsets} == {self.topic}, offsets
        if self.on_commit is not None:
            self.on_commit(committed)
        self.commits.append(committed)
        self.committed_offsets.update(committed)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {tp.partition for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {tp.partition for tp in partitions}

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.positions.get(tp.partition, NO_OFFSET))
                for tp in partitions]

    def committed(self, partitions: list[TopicPartition], timeout: float = -1
                  ) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition,
                               self.committed_offsets.get(tp.partition, NO_OFFSET))
                for tp in partitions]

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = -1,
                              cached: bool = False) -> tuple[int, int]:
        return 0, len(self.log[partition.partition])

    def consumer_group_metadata(self) -> object:
        return self.group_metadata

    def close(self) -> None:
        self.closed = True

    # -- membership --------------------------------------------------------------------------

    def _assign(self, partitions: list[int]) -> None:
        self.assigned |= set(partitions)
        for p in partitions:
            self.positions[p] = self.committed_offsets.get(p, 0)
        callback = self._callbacks["on_assign"]
        if callback is not None:
            callback(self, [TopicPartition(self.topic, p) for p in partitions])

    def _take_away(self, partitions: list[int], how: str) -> None:
        callback = self._callbacks[how]
        if callback is not None:  # called while the partitions are still owned
            callback(self, [TopicPartition(self.topic, p) for p in partitions])
        self.assigned -= set(partitions)
        for p in partitions:
            self.positions.pop(p, None)


@dataclass
class Transaction:
    records: list[Record] = field(default_factory=list)
    offsets: dict[int, int] | None = None  # sent with send_offsets_to_transaction
    group_metadata: object = None
    outcome: str = "open"  # then "committed" or "aborted"


class FakeProducer:
    """A producer whose broker answers as the module docstring says. ``refuse``: records
    (topic, key, value) it fails; ``transactional``: init_transactions() and the transaction
    calls are allowed, and :attr:`transactions` keeps each one. ``commit_errors``: raised by the
    next commit_transaction()s (a record refused in the transaction raises one anyway)."""

    REFUSED = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")

    def __init__(self, refuse: Callable[[str, bytes | None, bytes | None], bool] | None = None,
                 transactional: bool = False) -> None:
        self.refuse = refuse or (lambda topic, key, value: False)
        self.transactional = transactional
        self.in_flight: list[tuple[Record, Callable[..., None] | None]] = []
        self.acknowledged: list[Record] = []
        self.refused: list[Record] = []
        self.held = False
        self.waits = 0  # poll() with a timeout and flush(): the client waited for the broker
        self.on_wait: Callable[[], None] | None = None  # called at each wait, before answers
        self.transactions: list[Transaction] = []
        self.commit_errors: list[KafkaException] = []
        self._initialised = False
        self._offsets: dict[tuple[str, int], int] = {}

    def hold(self, held: bool = True) -> None:
        """Keep the broker's answers back (``held``) or let them come (False)."""
        self.held = held

    @property
    def open_transaction(self) -> Transaction | None:
        return self.transactions[-1] if self.transactions and \
            self.transactions[-1].outcome == "open" else None

    # -- producing ---------------------------------------------------------------------------

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                partition: int = -1, on_delivery: Callable[..., None] | None = None,
                headers: list[tuple[str, bytes]] | None = None, **ignored: Any) -> None:
        if self.transactional:
            assert self.open_transaction is not None, "produce() outside a transaction"
        part = max(partition, 0)
        offset = self._offsets.get((topic, part), 0)
        self._offsets[(topic, part)] = offset + 1
        record = Record(topic, part, offset, key, value, headers)
        self.in_flight.append((record, on_delivery))
        if self.open_transaction is not None:
            self.open_transaction.records.append(record)

    def produce_batch(self, topic: str, messages: list[dict[str, Any]], partition: int = -1,
                      on_delivery: Callable[..., None] | None = None) -> int:
        """As confluent-kafka 2.16's: each message dict queued as produce() would, to the
        call's ``partition`` (a ``partition`` in the dict is ignored, as there); returns how
        many were queued (all: this broker's local queue never fills)."""
        for message in messages:
            FakeProducer.produce(self, topic, message.get("value"), message.get("key"),
                                 partition, message.get("callback", on_delivery))
        return len(messages)

    def __len__(self) -> int:
        """Records produced and not answered yet (librdkafka's out-queue length)."""
        return len(self.in_flight)

    def poll(self, timeout: float | None = None) -> int:
        if timeout is None or timeout > 0:
            return self._wait()
        return 0

    def flush(self, timeout: float | None = None) -> int:
        """Answers everything in flight; returns how many records are left (all of them while
        :meth:`hold` keeps the answers back: the timeout ran out)."""
        self._wait()
        return len(self.in_flight)

    def _wait(self) -> int:
        self.waits += 1
        if self.on_wait is not None:
            self.on_wait()
        if self.held:
            return 0
        answered, self.in_flight = self.in_flight, []
        for record, on_delivery in answered:
            refused = self.refuse(record.topic(), record.key(), record.value())
            (self.refused if refused else self.acknowledged).append(record)
            if on_delivery is not None:
                on_delivery(self.REFUSED if refused else None, record)
        return len(answered)

    # -- transactions ------------------------------------------------------------------------

    def init_transactions(self, timeout: float | None = None) -> None:
        assert self.transactional, "init_transactions() on a producer without transactional.id"
        self._initialised = True

    def begin_transaction(self) -> None:
        assert self._initialised and self.open_transaction is None
        self.transactions.append(Transaction())

    def send_offsets_to_transaction(self, positions: list[TopicPartition], group_metadata: object,
                                    timeout: float | None = None) -> None:
        transaction = self.open_transaction
        assert transaction is not None, "offsets sent outside a transaction"
        transaction.offsets = {tp.partition: tp.offset for tp in positions}
        transaction.group_metadata = group_metadata

    def commit_transaction(self, timeout: float | None = None) -> None:
        transaction = self.open_transaction
        assert transaction is not None, "commit_transaction() without one open"
        self._wait()  # a commit flushes the transaction's records first
        if self.in_flight:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "Local: Timed out",
                                            retriable=True))
        if self.commit_errors:
            raise self.commit_errors.pop(0)
        if any(r in self.refused for r in transaction.records):
            raise KafkaException(KafkaError(KafkaError._INCONSISTENT,
                                            "a record of the transaction was refused",
                                            txn_requires_abort=True))
        transaction.outcome = "committed"

    def abort_transaction(self, timeout: float | None = None) -> None:
        transaction = self.open_transaction
        assert transaction is not None, "abort_transaction() without one open"
        self.in_flight = []  # purged, never answered
        transaction.outcome = "aborted"
