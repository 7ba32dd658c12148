"""The feature stage (consumer/window_stage.py) on a real broker: instances of ``triage
windows`` in one group, one of them killed with SIGKILL mid-stream and another started (two
rebalances; the survivors restore the killed one's stores from their changelogs). The values
they publish (the highest revision of each order) equal model/windows.py's offline computation
for 100% of the orders, with bursts, ties, redeliveries and orders out of order within their
partitions."""

from __future__ import annotations

import json
import random
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
from confluent_kafka import KafkaError, TopicPartition

from tests.helpers import TRIAGE, clean_env, get, wait_for
from triage.bus.clients import create_topics, make_consumer, make_producer, partitions_of
from triage.bus.embedded import free_port
from triage.consumer.window_stage import WindowStage, chosen_features, retention_ms
from triage.model.datagen import generate
from triage.model.orders import read_orders_csv
from triage.model.streams import reference_topic_partitions
from triage.model.windows import WINDOWED_FEATURES, offline_values, window_topic_specs
from triage.schemas.codec import Codec
from triage.settings import Settings

STAGE_WAIT_S = 120.0


def histories(tmp_path: Path) -> list[dict[str, Any]]:
    """Generated orders (a week, the generator's ties and repeat customers) and two bursts:
    one customer ordering to ten zips within ten minutes, one SKU ordered 40 times in as
    long, in time order; 30 orders delivered twice (the copy right after the original)."""
    generate(400, 31, tmp_path, weeks=1)
    records = read_orders_csv(tmp_path / "orders.csv").records()
    start = min(r["timestamp_ms"] for r in records) + 3 * 86_400_000
    records += [{"order_id": f"BURST-{i}", "customer_id": "C-BURST", "sku_code": "S-BURST",
                 "zip_code": f"99{i % 10:03d}", "timestamp_ms": start + i * 15_000 + i % 3}
                for i in range(40)]
    records.sort(key=lambda r: r["timestamp_ms"])
    again = set(random.Random(7).sample(range(len(records)), 30))
    return [copy for i, r in enumerate(records) for copy in ([r, dict(r)] if i in again
                                                              else [r])]


def expected_values(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict]:
    """(order_id, entity, entity value) -> feature name -> value, offline."""
    frame = pd.DataFrame(records)
    expected: dict[tuple[str, str, str], dict] = {}
    for feature in WINDOWED_FEATURES:
        for r, value in zip(records, offline_values(frame, feature), strict=True):
            key = (r["order_id"], feature.entity, r[feature.entity] or "")
            expected.setdefault(key, {})[feature.name] = None if value is None else float(value)
    return expected


class Outputs:
    """Reads the output topic (read_committed) as it grows: the highest revision per key."""

    def __init__(self, settings: Settings) -> None:
        topic = settings.topics.windowed_features_topic
        self.codec = Codec("windowed_features")
        self.consumer = make_consumer(settings.connection, f"test-reader-{uuid.uuid4().hex}")
        self.consumer.assign([TopicPartition(topic, tp.partition, 0)
                              for tp in partitions_of(self.consumer, topic)])
        self.latest: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.records = 0

    def read(self) -> None:
        for msg in self.consumer.consume(5000, 0.2):
            if msg.error() is not None:
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                continue
            out = self.codec.decode(msg.value())
            self.records += 1
            key = (out["order_id"], out["entity"], out["entity_value"])
            if key not in self.latest or out["revision"] > self.latest[key]["revision"]:
                self.latest[key] = out


def log_events(log: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a stage instance."""
    return [json.loads(line) for line in log.read_text().splitlines()
            if line.startswith("{")]


def store_partitions_of(log: Path) -> set[tuple[str, int]]:
    """(store, partition) of the repartition partitions an instance owns, by its log."""
    owned: set[tuple[str, int]] = set()
    for event in log_events(log) if log.exists() else []:
        if event.get("event") not in ("partitions_assigned", "partitions_revoked"):
            continue
        found = {(name.rsplit("-repartition", 1)[0], int(name.rsplit("[", 1)[1][:-1]))
                 for name in event["partitions"] if "-repartition[" in name}
        owned = owned | found if event["event"] == "partitions_assigned" else owned - found
    return owned


def publish(settings: Settings, records: list[dict[str, Any]]) -> None:
    codec = Codec("order")
    producer = make_producer(settings.connection)
    for r in records:
        producer.produce(settings.topics.orders_topic, key=r["order_id"].encode(),
                         value=codec.encode(r))
    assert producer.flush(30) == 0


def stage_settings(settings: Settings) -> Settings:
    """The test's settings with the stage's topics and group of its own, created."""
    run = uuid.uuid4().hex[:8]
    settings = settings.replace(windows_topic_prefix=f"windows-{run}",
                                windowed_features_topic=f"windowed_features-{run}",
                                windows_group_id=f"triage-windows-{run}",
                                reference_lateness_ms=1000,
                                # Orders up to 40 places late here: 16 hours of event time.
                                window_retention_s=3 * 86_400)
    create_topics(settings.connection, settings.topics,
                  reference_topic_partitions(settings.topics),
                  window_topic_specs(settings.topics, chosen_features([]),
                                     retention_ms(settings)))
    return settings


def out_of_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each record published up to 40 places late."""
    rng = random.Random(11)
    return [r for _, r in sorted(((i + rng.randint(0, 40), i), r)
                                 for i, r in enumerate(records))]


def assert_parity(outputs: Outputs, expected: dict[tuple[str, str, str], dict]) -> None:
    wrong = {key: (outputs.latest[key]["values"], want) for key, want in expected.items()
             if outputs.latest[key]["values"] != want or outputs.latest[key]["window_expired"]}
    assert not wrong, f"{len(wrong)} of {len(expected)} differ: {list(wrong.items())[:5]}"
    assert set(outputs.latest) == set(expected)
    assert any(v for want in expected.values() for v in want.values())  # the data exercise them


def test_windowed_values_equal_offline_under_a_kill_and_rebalances(
        settings: Settings, tmp_path: Path) -> None:
    settings = stage_settings(settings)
    records = histories(tmp_path)
    expected = expected_values(records)
    shuffled = out_of_order(records)
    env = clean_env(tmp_path, **{**settings.to_env(), "TRIAGE_LOG_FORMAT": "json"})
    logs: list[Path] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"{name}.log"
        logs.append(log)
        return subprocess.Popen([*TRIAGE, "windows"], env=env, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT)

    outputs = Outputs(settings)
    first, second = start("a"), start("b")
    third = None
    try:
        half = len(shuffled) // 2
        publish(settings, shuffled[:half])

        def published_and_first_holds_stores() -> bool:
            outputs.read()
            return outputs.records >= 100 and bool(store_partitions_of(logs[0]))

        wait_for("the stage's first outputs, the first instance owning stores",
                 published_and_first_holds_stores, first, STAGE_WAIT_S)
        publish(settings, shuffled[half:])
        first.kill()  # SIGKILL while it reads them: its open transaction is aborted
        first.wait()
        killed = store_partitions_of(logs[0])
        third = start("c")  # a rebalance more

        def restored_from_a_changelog() -> bool:
            """A survivor restored, with orders in it, a store partition the killed instance
            owned when it was killed."""
            return any(
                (event["store"], event["partition"]) in killed and event["orders"] > 0
                for log in logs[1:] if log.exists() for event in log_events(log)
                if event.get("event") == "store_restored")

        def all_answered_and_restored() -> bool:
            outputs.read()
            return set(expected) <= set(outputs.latest) and restored_from_a_changelog()

        wait_for("every order's windowed values and a restore", all_answered_and_restored,
                 second, STAGE_WAIT_S)
    finally:
        for proc in (first, second, third):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        outputs.read()  # anything published until they stopped
        outputs.consumer.close()
    assert_parity(outputs, expected)


def test_a_turn_aborted_by_a_rebalance_is_read_again_from_what_was_committed(
        settings: Settings, tmp_path: Path) -> None:
    """A rebalance that overtakes a turn's transaction (its offsets refused for an old group
    generation) aborts it; the instance reads on from the committed offsets with its stores
    as their changelogs committed them (``rewind``), and every value is still the offline
    one. The abort is real; the rebalance's refusal is stood in for by calling ``rewind``
    where the refusal would have, since a rebalance cannot be timed into one turn. Its probes
    and metrics answer over HTTP meanwhile."""
    port = free_port()
    settings = stage_settings(settings).replace(metrics_port=port, delivery_timeout_ms=45_000)
    records = histories(tmp_path)
    expected = expected_values(records)
    shuffled = out_of_order(records)
    half = len(shuffled) // 2
    publish(settings, shuffled[:half])
    stage = WindowStage(settings, worker_id="in-test", metrics_addr="127.0.0.1")
    assert get(port, "/healthz")[0] == 503  # starting: no turn yet
    # A turn waits TRIAGE_DELIVERY_TIMEOUT_MS for its acknowledgements, as a worker's batch.
    assert stage.committer.flush_timeout_s == 45.0
    outputs = Outputs(settings)
    try:
        def some_published() -> bool:
            stage.turn(stage.poll(100, 0.1))
            outputs.read()
            return outputs.records >= 100

        wait_for("the stage's first outputs", some_published, timeout_s=STAGE_WAIT_S)
        publish(settings, shuffled[half:])
        aborted = 0
        while aborted < 3:  # three turns with records, each aborted
            batch = stage.poll(100, 0.1)
            if batch and stage.produce_turn(batch) is not None:
                stage.rewind("injected")
                aborted += 1

        def all_answered() -> bool:
            stage.turn(stage.poll(100, 0.1))
            outputs.read()
            return set(expected) <= set(outputs.latest)

        wait_for("every order's windowed values", all_answered, timeout_s=STAGE_WAIT_S)
        health, ready = get(port, "/healthz"), get(port, "/readyz")
        metrics = get(port, "/metrics")[1]
    finally:
        stage.close()
        outputs.consumer.close()
    assert stage.counts["rewinds"] == 3
    assert_parity(outputs, expected)
    assert health[0] == 200 and ready[0] == 200
    assert "triage_windows_rewinds_total 3.0" in metrics
    assert "process_start_time_seconds" in metrics
    first = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith('triage_windows_answers_total{kind="first"'))
    # Counted once committed: each key once, not again for the aborted turns; an order with
    # no entity value is answered for each of its records (its values need no state).
    empty = sum(1 for r in records for entity in ("customer_id", "sku_code") if not r[entity])
    assert first == len([key for key in expected if key[2]]) + empty
    assert f"triage_windows_orders_total {float(len(records))}" in metrics
    for store in ("customer_id", "sku_code"):  # exported from the start, for increase()
        assert f'triage_windows_beyond_retention_total{{store="{store}"}}' in metrics
