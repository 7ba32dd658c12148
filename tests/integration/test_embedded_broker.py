"""The embedded broker's (tansu's) deviations from Apache Kafka, each measured on both brokers
side by side: what the table of docs/operating.md says is what these find. Where the integration
tests run on the embedded broker (no Java 17+), only its half runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from tests.helpers import EMBEDDED, Broker

pytestmark = pytest.mark.embedded


@pytest.fixture(params=["embedded", "apache-kafka"])
def each(request: pytest.FixtureRequest, embedded_broker: Broker, broker: Broker
         ) -> Iterator[Broker]:
    """The embedded broker, then the integration tests' one when that is Apache Kafka."""
    if request.param == "embedded":
        yield embedded_broker
    elif broker.kind == EMBEDDED:
        pytest.skip("the integration tests run on the embedded broker here (no Java 17+)")
    else:
        yield broker


def topic(b: Broker, partitions: int = 1) -> str:
    name = f"deviation-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": b.bootstrap})
    for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        future.result(timeout=30)
    return name


def read_all(b: Broker, name: str, isolation: str, expect_at_least: int) -> list[bytes]:
    """The values of partition 0 of ``name``, read up to its end (at least ``expect_at_least``
    of them, or for 20 s)."""
    consumer = Consumer({"bootstrap.servers": b.bootstrap, "group.id": uuid.uuid4().hex,
                         "isolation.level": isolation, "enable.partition.eof": True})
    consumer.assign([TopicPartition(name, 0, 0)])
    values: list[bytes] = []
    at_end = False
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline and not (at_end and len(values) >= expect_at_least):
            for msg in consumer.consume(100, 0.5):
                error = msg.error()
                if error is None:
                    values.append(msg.value())
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_end = True
    finally:
        consumer.close()
    return values


def test_aborted_transactions_are_hidden_from_read_committed_readers(each: Broker) -> None:
    name = topic(each)
    producer = Producer({"bootstrap.servers": each.bootstrap,
                         "transactional.id": uuid.uuid4().hex})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(name, b"aborted")
    producer.flush(10)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(name, b"committed")
    producer.commit_transaction(30)
    seen = read_all(each, name, "read_committed", expect_at_least=1)
    if each.kind == EMBEDDED:
        assert seen == [b"aborted", b"committed"]  # the deviation: aborted records shown
    else:
        assert seen == [b"committed"]


def test_list_offsets_latest_after_a_batched_produce(each: Broker) -> None:
    name = topic(each)
    producer = Producer({"bootstrap.servers": each.bootstrap, "linger.ms": 100})
    for i in range(175):
        producer.produce(name, str(i).encode())
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": each.bootstrap, "group.id": uuid.uuid4().hex})
    try:
        _, listed = consumer.get_watermark_offsets(TopicPartition(name, 0), timeout=10)
    finally:
        consumer.close()
    if each.kind == EMBEDDED:
        assert listed < 175  # the deviation: the last batch's base offset + 1
    else:
        assert listed == 175


def test_adding_partitions(each: Broker) -> None:
    name = topic(each, partitions=2)
    admin = AdminClient({"bootstrap.servers": each.bootstrap})
    future = admin.create_partitions([NewPartitions(name, 4)])[name]
    if each.kind == EMBEDDED:
        with pytest.raises(KafkaException):  # the deviation: refused
            future.result(timeout=30)
    else:
        future.result(timeout=30)
        assert len(admin.list_topics(name, timeout=10).topics[name].partitions) == 4


def test_a_first_group_join_takes_half_the_session_timeout(each: Broker) -> None:
    name = topic(each)
    consumer = Consumer({"bootstrap.servers": each.bootstrap, "group.id": uuid.uuid4().hex,
                         "session.timeout.ms": 6000})
    assigned: list[float] = []
    started = time.monotonic()
    consumer.subscribe([name], on_assign=lambda c, p: assigned.append(time.monotonic()))
    try:
        while not assigned and time.monotonic() - started < 30:
            consumer.consume(1, 0.1)
    finally:
        consumer.close()
    joined_s = assigned[0] - started
    if each.kind == EMBEDDED:
        assert joined_s >= 2.5  # the deviation: session.timeout.ms / 2
    else:
        assert joined_s < 2.5  # group.initial.rebalance.delay.ms=0 on the test cluster


def test_the_kip_848_protocol_is_refused_on_the_embedded_broker(
        embedded_broker: Broker, model_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update({"TRIAGE_BOOTSTRAP_SERVERS": embedded_broker.bootstrap,
                "TRIAGE_STATE_DIR": str(tmp_path), "TRIAGE_LOG_FORMAT": "json"})
    worker = subprocess.run([sys.executable, "-m", "triage.cli", "worker", "--model",
                             str(model_dir), "--group-protocol", "consumer"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2, worker.stderr[-2000:]
    assert "needs Apache Kafka 4.x" in worker.stderr + worker.stdout
    assert "Traceback" not in worker.stderr
