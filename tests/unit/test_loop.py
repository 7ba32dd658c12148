"""The batch loop (consumer/loop.py) and its commit strategies (consumer/commit.py) without a
broker, on the doubles of tests/unit/doubles.py: offsets are committed only once the broker
acknowledged every record their batch produced; a refused record commits nothing and stops
the loop with an InfrastructureError; a partition revoked in the middle of a batch loses its
records to the next owner, unhandled, after what was finished is committed; a stop request
ends the loop after its batch, committed; the pipelined strategy has at most two batches
produced and not committed; exactly once puts the offsets in each batch's transaction and
aborts it on a failure. The integration tier shows the same on a broker
(tests/integration/test_delivery.py, test_apache_kafka.py)."""

from __future__ import annotations

import pytest
import structlog
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from tests.unit.doubles import FakeConsumer, FakeProducer, Record
from triage.bus.errors import InfrastructureError
from triage.consumer.commit import MAX_UNCOMMITTED_BATCHES, AtLeastOnce, ExactlyOnce
from triage.consumer.loop import BatchLoop, Output
from triage.settings import Settings

TOPIC, OUT = "orders", "predictions"
STRATEGIES = pytest.mark.parametrize("exactly_once", [False, True],
                                     ids=["at-least-once", "exactly-once"])


def source(value: bytes | None) -> tuple[int, int]:
    """(partition, offset) of the consumed record an output was made from (its value)."""
    assert value is not None
    partition, offset = value.decode().split(":")
    return int(partition), int(offset)


class Echo:
    """A handler that produces one output per record (its value, so the output names its
    source) and keeps every batch it was given."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []
        self.before: list[object] = []  # what ``look`` saw as each batch came, if set
        self.look = None

    def __call__(self, records: list[Record]) -> list[Output]:
        if self.look is not None:
            self.before.append(self.look())
        self.batches.append([(r.partition(), r.offset()) for r in records])
        return [Output(OUT, r.key(), r.value()) for r in records]

    @property
    def handled(self) -> list[tuple[int, int]]:
        return [position for batch in self.batches for position in batch]


def loop_of(consumer: FakeConsumer, producer: FakeProducer, *, batch_size: int = 4,
            exactly_once: bool = False) -> BatchLoop:
    settings = Settings.of(orders_topic=TOPIC, batch_size=batch_size, exactly_once=exactly_once)
    loop = BatchLoop(settings.connection, settings.scorer, TOPIC, consumer=consumer,
                     producer=producer, log=structlog.get_logger("test"))
    if consumer.on_idle is None:
        consumer.on_idle = loop.request_stop  # everything consumed: stop, as a SIGTERM would
    return loop


def unacknowledged_below(consumer: FakeConsumer, producer: FakeProducer,
                         committed: dict[int, int]) -> list[tuple[int, int]]:
    """Sources of produced records not acknowledged although ``committed`` moves past them."""
    offsets = {**consumer.committed_offsets, **committed}
    sent = [r for batch in producer.transactions for r in batch.records] or \
        [r for r, _ in producer.in_flight] + producer.acknowledged + producer.refused
    acknowledged = {source(r.value()) for r in producer.acknowledged}
    return sorted(s for s in map(source, (r.value() for r in sent))
                  if s[1] < offsets.get(s[0], 0) and s not in acknowledged)


def test_offsets_are_committed_only_once_every_record_of_their_batch_is_acknowledged() -> None:
    consumer, producer = FakeConsumer(TOPIC, {0: 6, 1: 6}), FakeProducer()
    premature: list[list[tuple[int, int]]] = []
    consumer.on_commit = lambda offsets: premature.append(
        unacknowledged_below(consumer, producer, offsets))
    echo = Echo()
    echo.look = lambda: (len(producer.in_flight), dict(consumer.committed_offsets))
    loop_of(consumer, producer).run(echo)

    assert consumer.commits and premature == [[] for _ in consumer.commits]
    # The check had something to check: the second batch was handled while the first one's
    # records were still unacknowledged and its offsets uncommitted (the loop went on).
    assert echo.before[1] == (4, {})
    assert consumer.committed_offsets == {0: 6, 1: 6}
    assert sorted(source(r.value()) for r in producer.acknowledged) == sorted(echo.handled)
    assert len(echo.handled) == 12 and consumer.closed


@STRATEGIES
def test_a_refused_record_commits_nothing_and_stops_the_loop(exactly_once: bool) -> None:
    consumer = FakeConsumer(TOPIC, {0: 6, 1: 6})
    producer = FakeProducer(refuse=lambda topic, key, value: value == b"1:0",
                            transactional=exactly_once)
    echo = Echo()
    with pytest.raises(InfrastructureError, match="refused"):
        loop_of(consumer, producer, exactly_once=exactly_once).run(echo)

    assert (1, 0) in echo.batches[0]  # the refused record's batch was the first
    assert consumer.commits == [] and consumer.committed_offsets == {}
    assert [t.outcome for t in producer.transactions] == (["aborted"] if exactly_once else [])
    assert consumer.closed


def test_a_partition_revoked_during_a_batch_loses_its_records_unhandled_after_a_commit() -> None:
    consumer, producer = FakeConsumer(TOPIC, {0: 8, 1: 8}), FakeProducer()
    # Turn 1: consume(1) gives 0@0, consume(3) gives 1@0 0@1 1@1. Turn 2: consume(1) gives 0@2,
    # then partition 0 is revoked inside the turn's second consume().
    consumer.revoke_in(4, [0])
    owned_at_commit: list[tuple[dict[int, int], set[int]]] = []
    consumer.on_commit = lambda offsets: owned_at_commit.append((offsets, set(consumer.assigned)))
    echo = Echo()
    loop_of(consumer, producer).run(echo)

    assert echo.batches[0] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    # The finished batch was committed inside the revocation, partition 0 still owned:
    assert owned_at_commit[0] == ({0: 2, 1: 2}, {0, 1})
    # 0@2, consumed before the revocation, was dropped unhandled; only partition 1 went on.
    assert echo.batches[1] == [(1, 2), (1, 3), (1, 4)]
    assert [p for p, _ in echo.handled[4:]] == [1] * 6
    assert all(0 not in offsets for offsets, _ in owned_at_commit[1:])
    # The next owner of partition 0 starts where this worker finished: 0@2, read again.
    assert consumer.committed_offsets == {0: 2, 1: 8}


@STRATEGIES
def test_a_stop_request_ends_the_loop_after_its_batch_committed(exactly_once: bool) -> None:
    consumer = FakeConsumer(TOPIC, {0: 20}, on_idle=lambda: None)
    producer = FakeProducer(transactional=exactly_once)
    loop = loop_of(consumer, producer, exactly_once=exactly_once)
    echo = Echo()
    echo.look = lambda: len(echo.batches) == 1 and loop.request_stop()  # during the 2nd batch
    loop.run(echo)

    assert echo.handled == [(0, o) for o in range(8)]
    assert consumer.consume_calls == 4  # two turns of consume(1) + consume(3); none after
    if exactly_once:
        assert [(t.outcome, t.offsets) for t in producer.transactions] == \
            [("committed", {0: 4}), ("committed", {0: 8})]
        assert consumer.commits == []
    else:
        assert consumer.committed_offsets == {0: 8}
    assert sorted(source(r.value()) for r in producer.acknowledged) == echo.handled
    assert consumer.closed


def test_the_pipelined_strategy_has_at_most_two_batches_produced_and_not_committed() -> None:
    consumer, producer = FakeConsumer(TOPIC, {0: 40}), FakeProducer()
    echo = Echo()

    def uncommitted() -> int:
        """Batches handled whose offsets are not committed yet."""
        done = consumer.committed_offsets.get(0, 0)
        return sum(1 for batch in echo.batches if batch[-1][1] >= done)

    echo.look = uncommitted
    # The broker does not answer until the loop has waited three times; then it answers.
    held_waits: list[tuple[int, int]] = []

    def on_wait() -> None:
        if producer.held:
            held_waits.append((consumer.consume_calls, uncommitted()))
            producer.hold(len(held_waits) < 3)

    producer.hold()
    producer.on_wait = on_wait
    loop_of(consumer, producer).run(echo)

    assert MAX_UNCOMMITTED_BATCHES == 2
    # While nothing was acknowledged the loop went on to a second batch, then waited with the
    # two uncommitted, consuming nothing more (4 consume() calls: two turns).
    assert echo.before[:2] == [0, 1]
    assert held_waits == [(4, 2), (4, 2), (4, 2)]
    assert max(echo.before) == MAX_UNCOMMITTED_BATCHES - 1  # + the batch in hand: 2
    assert len(echo.batches) == 10 and consumer.committed_offsets == {0: 40}


def test_exactly_once_sends_each_batchs_offsets_in_its_transaction() -> None:
    consumer = FakeConsumer(TOPIC, {0: 6, 1: 6})
    producer = FakeProducer(transactional=True)
    echo = Echo()
    loop_of(consumer, producer, exactly_once=True).run(echo)

    assert len(echo.batches) == 3
    assert consumer.commits == []  # no offsets outside a transaction
    for batch, transaction in zip(echo.batches, producer.transactions, strict=True):
        assert transaction.outcome == "committed"
        assert [source(r.value()) for r in transaction.records] == batch
        assert transaction.offsets == {p: max(o for q, o in batch if q == p) + 1
                                       for p in {p for p, _ in batch}}
        assert transaction.group_metadata is consumer.group_metadata


def test_exactly_once_aborts_a_transaction_the_broker_would_not_commit() -> None:
    consumer = FakeConsumer(TOPIC, {0: 12})
    producer = FakeProducer(transactional=True)
    echo = Echo()
    echo.look = lambda: len(echo.batches) == 1 and producer.commit_errors.append(KafkaException(
        KafkaError(KafkaError._FENCED, "fenced by a newer producer", txn_requires_abort=True)))
    with pytest.raises(InfrastructureError, match=r"transaction failed.*aborted"):
        loop_of(consumer, producer, exactly_once=True).run(echo)

    assert [(t.outcome, t.offsets) for t in producer.transactions] == \
        [("committed", {0: 4}), ("aborted", {0: 8})]
    assert len(echo.batches) == 2 and consumer.commits == [] and consumer.closed


# -- AtLeastOnce (the drift monitor's): flush, then commit ----------------------------------------

def produced_batch(producer: FakeProducer, committer: AtLeastOnce, n: int) -> None:
    on_delivery = committer.begin()
    for offset in range(n):
        producer.produce(OUT, value=f"0:{offset}".encode(), on_delivery=on_delivery)


def test_at_least_once_commits_after_its_flush_found_every_record_acknowledged() -> None:
    consumer, producer = FakeConsumer(TOPIC, {0: 3}), FakeProducer()
    premature: list[list[tuple[int, int]]] = []
    consumer.on_commit = lambda offsets: premature.append(
        unacknowledged_below(consumer, producer, offsets))
    committer = AtLeastOnce(producer, consumer, structlog.get_logger("test"))
    produced_batch(producer, committer, 3)
    assert consumer.commits == []
    committer.finish([TopicPartition(TOPIC, 0, 3)])

    assert consumer.commits == [{0: 3}] and premature == [[]] and len(producer.acknowledged) == 3


@pytest.mark.parametrize("broker", ["refuses a record", "does not answer"])
def test_at_least_once_commits_nothing_when_a_record_is_not_acknowledged(broker: str) -> None:
    consumer = FakeConsumer(TOPIC, {0: 3})
    producer = FakeProducer(refuse=lambda topic, key, value: value == b"0:1")
    producer.hold(broker == "does not answer")
    committer = AtLeastOnce(producer, consumer, structlog.get_logger("test"),
                            flush_timeout_s=1.0)
    produced_batch(producer, committer, 3)
    with pytest.raises(InfrastructureError, match="not committing"):
        committer.finish([TopicPartition(TOPIC, 0, 3)])
    assert consumer.commits == []


def test_outputs_are_produced_in_their_order_runs_of_a_partition_batched_headers_one_by_one(
        ) -> None:
    """A batch's outputs go to the producer in the handler's order, each to the partition it
    names, whether in a run of records to one partition of one topic (produce_batch, whose
    partition is the call's) or one by one (a record with headers)."""
    consumer, producer = FakeConsumer(TOPIC, {0: 4}), FakeProducer()
    calls: list[str] = []
    produce, produce_batch = producer.produce, producer.produce_batch
    producer.produce = lambda *a, **k: (calls.append("produce"), produce(*a, **k))[1]
    producer.produce_batch = lambda *a, **k: (calls.append("batch"), produce_batch(*a, **k))[1]

    def handle(records: list[Record]) -> list[Output]:
        outputs = [Output(OUT, r.key(), r.value(), None, p)
                   for r, p in zip(records, [1, 1, 2, 1], strict=True)]
        letter = Output("dead-letters", None, b"letter", [("reason", b"bad")])
        return [*outputs[:2], letter, *outputs[2:], Output("drift", None, b"sample", None, 3)]

    loop_of(consumer, producer).run(handle)
    sent = [(r.topic(), r.partition(), r.value(), r.headers()) for r in producer.acknowledged]
    assert sent == [(OUT, 1, b"0:0", None), (OUT, 1, b"0:1", None),
                    ("dead-letters", 0, b"letter", [("reason", b"bad")]),
                    (OUT, 2, b"0:2", None), (OUT, 1, b"0:3", None), ("drift", 3, b"sample", None)]
    assert calls == ["batch", "produce", "batch", "batch", "batch"]


def test_exactly_once_takes_a_record_purged_by_an_abort_as_no_failure_of_the_next() -> None:
    """The feature stage aborts a turn and goes on: the purged records' reports, served in the
    next transaction, did fail its commit ("record(s) refused: Local: Purged in queue"). A
    record refused for another reason still does."""
    consumer, producer = FakeConsumer(TOPIC, {0: 1}), FakeProducer(transactional=True)
    committer = ExactlyOnce(producer, consumer, structlog.get_logger())
    on_delivery = committer.begin()
    for code in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT):
        on_delivery(KafkaError(code), Record(OUT, 0, 0, b"", b""))  # the aborted turn's
    committer.finish([TopicPartition(TOPIC, 0, 1)])
    assert [t.outcome for t in producer.transactions] == ["committed"]
    on_delivery = committer.begin()
    on_delivery(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), Record(OUT, 0, 1, b"", b""))
    with pytest.raises(InfrastructureError, match="refused"):
        committer.finish([TopicPartition(TOPIC, 0, 1)])
