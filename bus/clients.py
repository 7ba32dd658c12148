"""Kafka client configuration in one place, so every producer and consumer behaves alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic  # type: ignore[attr-defined]

from triage.bus.embedded import resolve_bootstrap
from triage.bus.errors import ConfigurationError, InfrastructureError
from triage.bus.logs import librdkafka_logger
from triage.bus.settings import ConnectionSettings, TopicSettings


def security_config(connection: ConnectionSettings) -> dict[str, Any]:
    """TLS and SASL client settings; only what is set, so librdkafka's defaults stay intact."""
    optional = {
        "sasl.mechanism": connection.sasl_mechanism,
        "sasl.username": connection.sasl_username,
        "sasl.password": connection.sasl_password,
        "ssl.ca.location": connection.ssl_ca_location,
        "ssl.certificate.location": connection.ssl_certificate_location,
        "ssl.key.location": connection.ssl_key_location,
        "ssl.key.password": connection.ssl_key_password,
    }
    return {"security.protocol": connection.security_protocol,
            **{key: value for key, value in optional.items() if value}}


def base_config(connection: ConnectionSettings) -> dict[str, Any]:
    """What every client shares. ``topic.metadata.refresh.interval.ms`` bounds how long a
    client takes to see a topic created again (after a broker lost it) or a partition added:
    librdkafka's default, 5 minutes, would leave a worker assigned nothing that long.

    ``logger`` routes librdkafka's own log lines through structlog (bus/logs.py) instead of
    librdkafka printing them to stderr: they come out only while the client is polled
    (``poll``, ``consume``, ``flush``); a client never polled drops them when destroyed."""
    return {
        "bootstrap.servers": resolve_bootstrap(connection.bootstrap_servers,
                                               connection.state_dir),
        "client.id": "triage",
        "topic.metadata.refresh.interval.ms": connection.metadata_refresh_ms,
        "logger": librdkafka_logger(),
        **security_config(connection),
    }


# Largest record a producer here sends (librdkafka's default, written out so that code sizing
# records, such as dead letters, and the client agree).
PRODUCER_MAX_MESSAGE_BYTES = 1_000_000
# Records a producer here queues, in flight included (librdkafka's default, written out for
# produce_batch's room check).
PRODUCER_QUEUE_MESSAGES = 100_000


def producer_config(connection: ConnectionSettings, **overrides: Any) -> dict[str, Any]:
    """Idempotent producer: retries never duplicate or reorder within a partition. Keys are
    partitioned with the Java client's partitioner (``murmur2_random``; librdkafka's default,
    ``consistent_random``, hashes differently), so that an order and its payments published by
    a store's Java producers, or by ours, land on the same partition number."""
    return {
        **base_config(connection),
        "partitioner": "murmur2_random",
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        "message.max.bytes": PRODUCER_MAX_MESSAGE_BYTES,
        "queue.buffering.max.messages": PRODUCER_QUEUE_MESSAGES,
        **overrides,
    }


def topic_max_message_bytes(connection: ConnectionSettings, topic: str,
                            timeout_s: float = 10.0) -> int | None:
    """The topic's ``max.message.bytes`` (the largest record batch the brokers accept), or None
    when the broker does not say (the embedded broker answers DescribeConfigs with nothing) or
    cannot be asked."""
    admin = make_admin(connection)
    try:
        futures = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)],
                                         request_timeout=timeout_s)
        configs = next(iter(futures.values())).result(timeout=timeout_s)
    except Exception:  # an old broker, no DescribeConfigs ACL, a timeout: use the producer's
        return None
    finally:
        admin.poll(0)  # its log lines
    entry = configs.get("max.message.bytes")
    return int(entry.value) if entry is not None and str(entry.value).isdigit() else None


def consumer_config(connection: ConnectionSettings, group_id: str,
                    **overrides: Any) -> dict[str, Any]:
    """Manual commits only: offsets are committed by the code that knows what was delivered."""
    return {
        **base_config(connection),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "max.poll.interval.ms": connection.max_poll_interval_ms,
        **group_protocol_config(connection),
        "isolation.level": "read_committed",  # never see an aborted transaction's records
        # Latency: a fetch returns within 10 ms when no data is waiting (Apache Kafka answers
        # as soon as data arrives anyway; the embedded broker only at this deadline).
        "fetch.wait.max.ms": 10,
        # Memory: prefetch about 1,000 records / 4 MB per partition instead of librdkafka's
        # 100,000; fetch again 10 ms after the queue drains (default 1 s, which starves us).
        "queued.min.messages": 1000,
        "queued.max.messages.kbytes": 4096,
        "fetch.queue.backoff.ms": 10,
        **overrides,
    }


def group_protocol_config(connection: ConnectionSettings) -> dict[str, Any]:
    """The group protocol's client settings: the classic protocol's session, heartbeat and
    assignor, or KIP-848's ``group.protocol=consumer``, under which the broker owns those
    (librdkafka refuses them then)."""
    if connection.group_protocol == "consumer":
        return {"group.protocol": "consumer"}
    return {"session.timeout.ms": connection.session_timeout_ms,
            "heartbeat.interval.ms": max(1, connection.session_timeout_ms // 3),
            "partition.assignment.strategy": connection.assignment_strategy}


def make_producer(connection: ConnectionSettings, **overrides: Any) -> Producer:
    return Producer(producer_config(connection, **overrides))


def produce(producer: Producer, topic: str, **kwargs: Any) -> None:
    """``producer.produce``, waiting out a full local queue instead of failing."""
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:  # serve delivery reports so the queue drains, then try again
            producer.poll(0.05)


def produce_batch(producer: Producer, topic: str, messages: list[dict[str, Any]],
                  partition: int = -1,
                  on_delivery: Callable[[KafkaError | None, Message], None] | None = None
                  ) -> None:
    """``producer.produce_batch``: ``messages`` (dicts of ``key`` and ``value``; no headers) to
    ``partition`` of ``topic`` (-1: the partitioner's choice by key), queued in their order,
    one call a chunk of up to half the local queue instead of one call a record. The partition
    is the call's: confluent-kafka 2.16 ignores a ``partition`` in a message's dict (measured:
    such records went where their keys hashed). Before each chunk it waits (serving delivery
    reports) until the queue's count of records has room for all of it, so that none is
    refused for a full queue while a later one is queued, which would reorder them; a producer
    made with ``producer_config`` holds ``PRODUCER_QUEUE_MESSAGES`` records and 1 GiB
    (librdkafka's ``queue.buffering.max.kbytes``, far beyond the loop's two batches). Raises
    KafkaException with the error of the first record refused (what ``produce`` raises for it;
    librdkafka may still have queued records after it: the caller must not commit, as with
    any failed delivery)."""
    step = PRODUCER_QUEUE_MESSAGES // 2
    for start in range(0, len(messages), step):
        chunk = messages[start:start + step] if len(messages) > step else messages
        while len(producer) + len(chunk) > PRODUCER_QUEUE_MESSAGES:
            producer.poll(0.05)
        if producer.produce_batch(topic, chunk, partition=partition,
                                  on_delivery=on_delivery) < len(chunk):
            error = next((m["_error"] for m in chunk if "_error" in m),
                         KafkaError(KafkaError._FAIL, "produce_batch queued fewer records"))
            raise KafkaException(error)


class Source(NamedTuple):
    """Where a record was read on Kafka (one per consumed record: a NamedTuple, made in a
    quarter of a frozen dataclass's time)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int  # the record's Kafka timestamp: UTC milliseconds since the epoch


def source_of(msg: Message) -> Source:
    """A consumed or delivered record's coordinates. Raises InfrastructureError for an event
    that is not a record (librdkafka gives those no partition or offset); records_of() and
    delivery reports without an error only hold records."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise InfrastructureError(f"not a record: {msg.error()}")
    return Source(topic, partition, offset, msg.timestamp()[1])


def records_of(batch: list[Message], log: Any) -> list[Message]:
    """The records of a consumed batch, without its events: partition ends are skipped, a fatal
    error raises, any other error is logged (librdkafka retries those on its own)."""
    records = []
    for msg in batch:
        err = msg.error()
        if err is None:
            records.append(msg)
        elif err.fatal():
            raise KafkaException(err)
        elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            log.warning("topic_missing", error=err.str(),
                        note="waiting for it; a topic created again is picked up within "
                        "TRIAGE_METADATA_REFRESH_MS")
        elif err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer_error", error=err.str())
    return records


def make_consumer(connection: ConnectionSettings, group_id: str, **overrides: Any) -> Consumer:
    return Consumer(consumer_config(connection, group_id, **overrides))


def make_admin(connection: ConnectionSettings) -> AdminClient:
    """An AdminClient with the shared configuration. Its librdkafka log lines are logged only
    when it is polled: call ``admin.poll(0)`` after its requests (the helpers here do)."""
    return AdminClient(base_config(connection))


def is_embedded(connection: ConnectionSettings, timeout_s: float = 30.0) -> bool:
    """Whether the broker is the embedded one (tansu names its cluster ``tansu_cluster``).
    Raises KafkaException if the broker does not answer in time."""
    admin = make_admin(connection)  # kept alive until the answer
    try:
        cluster = admin.describe_cluster(request_timeout=timeout_s).result(timeout=timeout_s)
    finally:
        admin.poll(0)  # its log lines
    return bool(cluster.cluster_id == "tansu_cluster")


# The models control topic keeps the latest state record for ever: compacted, never deleted.
CONTROL_TOPIC_CONFIG = {"cleanup.policy": "compact"}
# Reference topics keep their whole history (an as-of join needs it; compaction would keep one
# record per key): the delete policy with no time or size limit.
REFERENCE_TOPIC_CONFIG = {"cleanup.policy": "delete", "retention.ms": "-1",
                          "retention.bytes": "-1"}


def topic_specs(topics: TopicSettings, reference: Mapping[str, int]) -> dict[str, int]:
    """Topic name -> partition count for every topic the service uses; ``reference``: the
    reference streams' topics and counts (model/streams.py ``reference_topic_partitions``:
    co-partitioned with the orders or ``TRIAGE_REFERENCE_PARTITIONS``)."""
    return {
        topics.orders_topic: topics.orders_partitions,
        topics.predictions_topic: topics.output_partitions,
        topics.drift_topic: topics.output_partitions,
        topics.dlq_topic: topics.output_partitions,
        # One partition: a few reports per hour, read back in window order by the HTML report.
        topics.drift_reports_topic: 1,
        **reference,
        topics.reference_dlq_topic: topics.output_partitions,
        topics.shadow_topic: topics.output_partitions,
        # One partition, compacted: one key, the whole model state (scoring/follower.py).
        topics.models_topic: 1,
    }


def create_topics(connection: ConnectionSettings, topics: TopicSettings,
                  reference: Mapping[str, int],
                  windows: Mapping[str, tuple[int, dict[str, str]]] | None = None,
                  timeout_s: float = 30.0) -> dict[str, str]:
    """Create the service's topics, ``reference`` (topic -> partitions) the reference streams'
    (kept forever: REFERENCE_TOPIC_CONFIG), ``windows`` (topic -> (partitions, configs)) the
    feature stage's (model/windows.py ``window_topic_specs``); existing ones are left as they
    are. Returns name -> outcome. Raises KafkaException for a refusal other than "exists",
    InfrastructureError if the broker's metadata does not show them within ``timeout_s``."""
    admin = make_admin(connection)
    specs = topic_specs(topics, reference)
    configs = {name: REFERENCE_TOPIC_CONFIG for name in reference}
    configs[topics.models_topic] = CONTROL_TOPIC_CONFIG
    for name, (partitions, config) in (windows or {}).items():
        specs[name], configs[name] = partitions, config
    futures = admin.create_topics(
        [NewTopic(name, partitions, topics.replication_factor, config=configs.get(name, {}))
         for name, partitions in specs.items()],
        request_timeout=timeout_s)
    outcome = {}
    try:
        for name, future in futures.items():
            try:
                future.result()
                outcome[name] = f"created ({specs[name]} partitions)"
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise
                outcome[name] = "exists"
    finally:
        admin.poll(0)  # its log lines
    created = [name for name, what in outcome.items() if what != "exists"]
    _await_metadata(admin, {name: specs[name] for name in created}, timeout_s)
    return outcome


def _await_metadata(admin: AdminClient, partitions: dict[str, int], timeout_s: float) -> None:
    """Wait until the broker's metadata shows every topic of ``partitions`` (name -> count)
    with its partitions: CreateTopics answers once the controller has them, and a client
    asking the broker right after may still be told UNKNOWN_TOPIC_OR_PART (1 in 15 on Apache
    Kafka 4.1, a topic of 6 partitions). Raises InfrastructureError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while partitions:
        found = admin.list_topics(timeout=max(0.1, deadline - time.monotonic())).topics
        admin.poll(0)
        partitions = {name: count for name, count in partitions.items()
                      if name not in found or found[name].error is not None
                      or len(found[name].partitions) < count}
        if partitions and time.monotonic() >= deadline:
            raise InfrastructureError(f"topics created but not in the broker's metadata after "
                                      f"{timeout_s:g} s: {', '.join(sorted(partitions))}")
        if partitions:
            time.sleep(0.05)  # the broker's metadata catches up with its controller


BROKER_CHECK_S = 10.0  # how long a process waits for its first metadata answer


def check_brokers(client: Producer | Consumer | AdminClient, connection: ConnectionSettings,
                  timeout_s: float = BROKER_CHECK_S) -> None:
    """Ask the brokers for metadata once; raise InfrastructureError saying where it looked and
    what to check when none answers within ``timeout_s`` (a wrong address, brokers down or
    unreachable, security settings they refuse all look alike from here)."""
    try:
        client.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        error = exc.args[0].str() if exc.args and isinstance(exc.args[0], KafkaError) else exc
        address = resolve_bootstrap(connection.bootstrap_servers, connection.state_dir)
        raise InfrastructureError(
            f"no Kafka broker answered at {address} within {timeout_s:.0f} s ({error}): check "
            "TRIAGE_BOOTSTRAP_SERVERS (or --bootstrap), that the brokers are running and "
            "reachable from here, and the security settings (TRIAGE_SECURITY_PROTOCOL, "
            "TRIAGE_SASL_*, TRIAGE_SSL_*)") from exc


def require_topics(client: Producer | Consumer | AdminClient, topic_names: list[str],
                   timeout_s: float = BROKER_CHECK_S) -> dict[str, int]:
    """Each of ``topic_names`` -> its partition count; raise ConfigurationError naming those
    the brokers do not have, and how to create them. Asks for every topic's metadata at once,
    not for these by name: a metadata request that names a topic makes a broker with
    auto-creation create it, with the broker's default partition count (a worker started
    before `triage topics create` left an orders topic of 4 partitions beside reference
    topics of 6). Raises KafkaException if the brokers do not answer within ``timeout_s``. An
    AdminClient is polled afterwards, as :func:`partitions_of` polls it, so that its log lines
    (the brokers' refusals) come out."""
    try:
        found = client.list_topics(timeout=timeout_s).topics
    finally:
        if isinstance(client, AdminClient):
            client.poll(0)
    missing = [t for t in topic_names if t not in found or found[t].error is not None]
    if missing:
        raise ConfigurationError(
            f"topic{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found on the "
            "brokers: create the project's topics with `triage topics create` (with the same "
            "TRIAGE_*_TOPIC settings as this command), or point those settings at topics "
            "that exist")
    return {t: len(found[t].partitions) for t in topic_names}


def records_in(consumer: Consumer, topic_names: list[str], timeout_s: float = 5.0
               ) -> int | None:
    """Records held by every partition of ``topic_names`` (high - low watermark, asked of the
    brokers: one metadata request, then the partitions side by side). A topic that does not
    exist counts 0; None when the brokers do not answer in time."""
    try:
        found = consumer.list_topics(timeout=timeout_s).topics
        partitions = [TopicPartition(topic, p) for topic in topic_names
                      if topic in found and found[topic].error is None
                      for p in found[topic].partitions]
        if not partitions:
            return 0
        with ThreadPoolExecutor(max_workers=min(16, len(partitions))) as pool:
            marks = list(pool.map(
                lambda tp: consumer.get_watermark_offsets(tp, timeout=timeout_s), partitions))
    except KafkaException:
        return None
    return sum(max(0, high - low) for low, high in marks)


def partitions_of(client: Producer | Consumer | AdminClient, topic: str,
                  timeout_s: float = 10.0) -> list[TopicPartition]:
    """Every partition of ``topic``; raises KafkaException if the topic does not exist or the
    brokers do not answer within ``timeout_s``. An AdminClient is polled afterwards, so that
    its log lines come out (a consumer is not: polling it would consume)."""
    try:
        meta = client.list_topics(topic, timeout=timeout_s).topics[topic]
    finally:
        if isinstance(client, AdminClient):
            client.poll(0)
    if meta.error is not None:
        raise KafkaException(meta.error)
    return [TopicPartition(topic, p) for p in sorted(meta.partitions)]
