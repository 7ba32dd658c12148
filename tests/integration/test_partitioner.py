"""The documented partitioner (bus/partitioner.py): Kafka's murmur2, held to the Java client's
own test vectors and to where librdkafka's murmur2_random really puts keys on a broker.

This half needs a broker or starts processes; tests/unit/test_partitioner.py has the rest."""

from __future__ import annotations

from triage.bus.clients import make_producer, produce_batch
from triage.bus.partitioner import partitions_for
from triage.settings import Settings


def test_partitions_are_where_librdkafkas_murmur2_random_puts_them(settings: Settings) -> None:
    keys = [f"O-{i:09d}-{i * 7919 % 65536:04x}".encode() for i in range(300)]
    producer = make_producer(settings.connection)  # partitioner=murmur2_random
    landed: dict[bytes, int] = {}
    for key in keys:
        producer.produce(settings.topics.topic_of("payments"), key=key, value=b"x",
                         on_delivery=lambda err, msg: landed.__setitem__(msg.key(),
                                                                         msg.partition()))
    assert producer.flush(30) == 0
    expected = partitions_for(keys, settings.topics.orders_partitions)
    assert [landed[k] for k in keys] == expected.tolist()


def test_a_run_produced_in_one_call_lands_on_the_partition_it_names(settings: Settings) -> None:
    """bus/clients.produce_batch: the call's partition, whatever the keys hash to (a partition
    in each message's dict is ignored by confluent-kafka 2.16: the loop once lost it)."""
    keys = [f"O-{i:09d}".encode() for i in range(60)]
    topic, partitions = settings.topics.topic_of("payments"), settings.topics.orders_partitions
    named = {key: (p + 1) % partitions
             for key, p in zip(keys, partitions_for(keys, partitions).tolist(), strict=True)}
    producer = make_producer(settings.connection)
    landed: dict[bytes, int] = {}
    for target in range(partitions):
        run = [{"key": key, "value": b"x"} for key in keys if named[key] == target]
        produce_batch(producer, topic, run, target,
                      lambda err, msg: landed.__setitem__(msg.key(), msg.partition()))
    assert producer.flush(30) == 0
    assert landed == named  # none where its key hashes
