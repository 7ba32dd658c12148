"""The live reference join on a real broker: workers with no reference CSVs learn inventory,
payments and zip roll-outs from the topics, and every prediction's features equal
pandas.merge_asof over the complete CSVs; when the streams come late, orders wait for them,
or, past the max wait, are scored and say so; a killed worker restores and stays exact; bad
reference records are dead-lettered; payments not co-partitioned with orders are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_features import oracle
from triage.bus.clients import create_topics, make_admin, make_producer
from triage.bus.offsets import committed_offsets
from triage.bus.settings import Settings
from triage.consumer.deadletter import headers_dict
from triage.consumer.reader import TopicReader, collect
from triage.consumer.supervisor import Supervisor
from triage.model.datagen import generate
from triage.model.orders import read_orders_csv
from triage.producer.replay import replay
from triage.schemas.codec import Codec

pytestmark = pytest.mark.integration
ORDERS = 1_500


@pytest.fixture(scope="module")
def live_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,500 orders over one week, with their reference histories (ties included)."""
    path = tmp_path_factory.mktemp("live")
    generate(ORDERS, 23, path, weeks=1)
    return path


@pytest.fixture(scope="module")
def expected(live_data: Path) -> dict[str, dict]:
    """order_id -> the four features merge_asof gives over the complete CSVs."""
    frame = oracle(live_data)
    ids = read_orders_csv(live_data / "orders.csv").order_id
    return {order_id: {"order_hour_of_day": int(row.order_hour_of_day),
                       "inventory": None if np.isnan(row.inventory) else float(row.inventory),
                       "payment_status": row.payment_status,
                       "zip_code_available": bool(row.zip_code_available)}
            for order_id, row in zip(ids, frame.itertuples(), strict=True)}


def start(settings: Settings, model_dir: Path, workers: int) -> Supervisor:
    """Workers with no reference CSVs (the live path), supervised in a thread, settled."""
    supervisor = Supervisor(settings, model_dir, None, workers=workers)
    supervisor.start()
    threading.Thread(target=supervisor.run, daemon=True).start()
    supervisor.wait_until_assigned(settings.topics.orders_partitions)
    return supervisor


def predictions(settings: Settings, order_ids: set[str], since_ms: int) -> dict[str, list]:
    return collect(settings.connection, settings.topics.predictions_topic, "prediction",
                   order_ids, timeout_s=120, since_ms=since_ms)


def test_replaying_a_directory_gives_every_order_the_features_merge_asof_gives(
        settings: Settings, live_data: Path, model_dir: Path, expected: dict) -> None:
    settings = settings.replace(reference_max_wait_ms=60_000)  # exact, or the test fails
    supervisor = start(settings, model_dir, workers=2)
    try:
        since = int(time.time() * 1000)
        summary = replay(settings, live_data, progress=False)
        assert summary.failed == 0 and summary.by_stream["orders"] == ORDERS
        found = predictions(settings, set(expected), since)
        statuses = supervisor.statuses().values()  # readiness and tables, as workers report
        assert all(s["restored"] and s["reference_records"] > 0 for s in statuses)
    finally:
        supervisor.stop()
    wrong = [o for o, records in found.items() if records[0]["features"] != expected[o]]
    assert wrong == [], f"{len(wrong)} of {ORDERS} orders differ from merge_asof: {wrong[:3]}"
    assert not any(r[0]["reference_wait_expired"] for r in found.values())


def test_orders_before_their_reference_data_wait_for_it_or_say_they_could_not(
        settings: Settings, live_data: Path, model_dir: Path, expected: dict) -> None:
    """The orders first, the reference streams 2 s later: still 100% (the orders waited).
    Then, on fresh topics, with a max wait of 1 s and the streams 4 s late: the orders are
    scored without them, flagged, and none is lost."""
    settings = settings.replace(reference_max_wait_ms=60_000)
    supervisor = start(settings, model_dir, workers=1)
    try:
        since = int(time.time() * 1000)
        replay(settings, live_data, streams=["orders"], progress=False)
        time.sleep(2.0)  # the scenario: the reference streams come 2 s after the orders
        # Waiting orders are consumed but not committed: a crash now would read them again.
        committed = committed_offsets(settings.connection, settings.scorer.group_id,
                                      settings.topics.orders_topic)
        assert all(not offset for offset in committed.values()), committed
        replay(settings, live_data, streams=["payments", "inventory", "zip_codes"],
               progress=False)
        found = predictions(settings, set(expected), since)
    finally:
        supervisor.stop()
    assert all(records[0]["features"] == expected[o] for o, records in found.items())
    assert not any(r[0]["reference_wait_expired"] for r in found.values())

    late = settings.replace(**{name: f"{getattr(settings.topics, name)}-late" for name in (
        "orders_topic", "predictions_topic", "payments_topic", "inventory_topic",
        "zip_codes_topic", "drift_topic", "dlq_topic", "reference_dlq_topic")},
        group_id=settings.scorer.group_id + "-late", reference_max_wait_ms=1_000)
    create_topics(late.connection, late.topics)
    supervisor = start(late, model_dir, workers=1)
    try:
        since = int(time.time() * 1000)
        replay(late, live_data, streams=["orders"], progress=False)
        time.sleep(4.0)  # past the max wait: the orders are scored without the streams
        replay(late, live_data, streams=["payments", "inventory", "zip_codes"], progress=False)
        found = predictions(late, set(expected), since)
    finally:
        supervisor.stop()
    assert set(found) == set(expected)  # none lost
    flagged = [o for o, records in found.items() if records[0]["reference_wait_expired"]]
    assert len(flagged) == ORDERS
    assert all(found[o][0]["features"]["payment_status"] == "MISSING" for o in flagged)


def test_a_worker_killed_mid_stream_restores_and_stays_exact(
        settings: Settings, live_data: Path, model_dir: Path, expected: dict) -> None:
    settings = settings.replace(reference_max_wait_ms=60_000)
    supervisor = start(settings, model_dir, workers=2)
    try:
        since = int(time.time() * 1000)
        feeding = threading.Thread(target=replay, args=(settings, live_data),
                                   kwargs={"rate": 40_000, "progress": False})
        feeding.start()
        time.sleep(1.5)
        os.kill(supervisor.pids()[0], signal.SIGKILL)  # the supervisor restarts it
        feeding.join(120)
        found = predictions(settings, set(expected), since)
    finally:
        supervisor.stop()
    assert supervisor.restarts >= 1
    assert all(records[0]["features"] == expected[o] for o, records in found.items())
    for records in found.values():  # duplicates, if any, are the same prediction
        content = [{k: v for k, v in r.items() if k != "scored_at_ms"} for r in records]
        assert all(c == content[0] for c in content)


def test_a_bad_reference_record_is_dead_lettered_and_moves_nothing(
        settings: Settings, live_data: Path, model_dir: Path) -> None:
    codec = Codec("inventory")
    producer = make_producer(settings.connection)
    producer.produce(settings.topics.inventory_topic, key=b"S", value=b"not avro")
    producer.produce(settings.topics.inventory_topic, key=b"S", value=codec.encode(
        {"sku_code": "", "timestamp_ms": 1_767_607_200_000, "inventory": 1.0}))
    assert producer.flush(30) == 0
    supervisor = start(settings.replace(reference_max_wait_ms=60_000), model_dir, workers=1)
    try:
        with TopicReader(settings.connection, settings.topics.reference_dlq_topic,
                         None) as reader:
            letters = []
            deadline = time.monotonic() + 60
            while len(letters) < 2 and time.monotonic() < deadline:
                letters += [headers_dict(m.headers()) for m, _ in reader.poll(timeout_s=0.5)]
    finally:
        supervisor.stop()
    assert sorted(h["triage.errors.reason"] for h in letters) == ["missing_field",
                                                                   "unknown_framing"]
    assert {h["__connect.errors.topic"] for h in letters} == {settings.topics.inventory_topic}


def test_payments_not_co_partitioned_with_orders_are_refused(
        settings: Settings, model_dir: Path, tmp_path: Path) -> None:
    from confluent_kafka.admin import NewTopic

    odd = settings.replace(payments_topic=settings.topics.payments_topic + "-odd")
    admin = make_admin(odd.connection)
    futures = admin.create_topics([NewTopic(odd.topics.payments_topic, 2, 1)])
    for future in futures.values():
        future.result()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update({**odd.to_env(), "TRIAGE_LOG_FORMAT": "json"})
    worker = subprocess.run([sys.executable, "-m", "triage.consumer.worker", "--model",
                             str(model_dir)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert worker.returncode == 2, worker.stderr[-2000:]
    assert "must be co-partitioned with orders" in worker.stderr

