"""What only Apache Kafka can show (bus/apache_kafka.py starts it; conftest.py says when): a
zombie worker fenced under --exactly-once, rolling restarts with static membership under the
classic and the KIP-848 group protocols, partitions added to payments and orders while workers
run. Real processes, really frozen and restarted; figures to results/delivery/ like
tests/test_delivery.py's."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import NewPartitions

from tests.helpers import (
    EMBEDDED,
    Background,
    Broker,
    assert_never_silently_wrong,
    order_ids,
    outcome,
    predictions,
    report,
)
from triage.bus.clients import make_admin
from triage.consumer.supervisor import Supervisor
from triage.model.streams import reference_topic_partitions
from triage.producer.replay import replay
from triage.settings import Settings


@pytest.fixture(autouse=True)
def apache_kafka(broker: Broker) -> None:
    if broker.kind == EMBEDDED:
        pytest.skip("needs Apache Kafka (make venv fetches it; Java 17+): the embedded broker "
                    "does not hide aborted transactions, add partitions or speak KIP-848")


def wait_until(what: str, condition: object, timeout_s: float = 60.0) -> float:
    """Seconds until ``condition()`` holds; fails naming ``what`` after ``timeout_s``."""
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.1)
    return time.monotonic() - started


def test_a_frozen_worker_is_fenced_and_publishes_nothing_visible(
        settings: Settings, history: Path, model_dir: Path) -> None:
    """--exactly-once, two workers: one is frozen (SIGSTOP) until its partitions have moved to
    the other, then resumed. Its open transaction is aborted (KIP-447: the group metadata sent
    with the offsets is stale) and a read_committed reader sees every order exactly once."""
    n = 6_000
    settings = settings.replace(exactly_once=True)
    bg = Background()
    supervisor, since = bg.start(settings, model_dir, history, workers=2, orders=n,
                                 rate=1_000)
    try:
        time.sleep(1.5)  # the scenario: freeze one worker in the middle of the stream
        frozen, other = sorted(supervisor.statuses().items())
        os.kill(frozen[1]["pid"], signal.SIGSTOP)

        def moved() -> bool:  # the other worker (perhaps restarted: see below) owns them all
            status = supervisor.statuses().get(other[0], {})
            return sorted(status.get("partitions", [])) == list(
                range(settings.topics.orders_partitions))

        # The rebalance also fails the other worker's transaction in flight (its offsets carry
        # the old generation): it aborts, exits 1 and is restarted, and reads the batch again.
        try:
            moved_s = wait_until("the other worker owns every partition", moved)
        finally:
            os.kill(frozen[1]["pid"], signal.SIGCONT)
        bg.wait_replay()
        result = outcome(settings, order_ids(history, n), since)
    finally:
        supervisor.stop()
    result.assert_nothing_lost_and_copies_identical(order_ids(history, n))
    assert result.duplicates == 0
    report("exactly_once_zombie", orders=n, partitions_moved_after_s=round(moved_s, 1),
           lost=0, duplicates=0)


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_a_rolling_restart_with_static_membership_gets_each_worker_its_partitions_back(
        protocol: str, settings: Settings, history: Path, model_dir: Path) -> None:
    """Three workers with instance ids (``--instance-id``), restarted one after another
    (SIGTERM; the supervisor starts it again with the same id) while orders flow: each gets
    back the partitions it had, nothing is lost, and the time to resume and the duplicates
    are measured, under the classic protocol and under KIP-848's."""
    n = 12_000
    settings = settings.replace(instance_id="pod", group_protocol=protocol)
    bg = Background()
    supervisor, since = bg.start(settings, model_dir, history, workers=3, orders=n,
                                 rate=1_000)
    resumed: list[float] = []
    try:
        for worker in sorted(supervisor.statuses()):
            before = supervisor.statuses()[worker]
            os.kill(before["pid"], signal.SIGTERM)
            started = time.monotonic()

            def back(worker: str = worker, before: dict = before) -> bool:
                now = supervisor.statuses().get(worker)
                return now is not None and now["pid"] != before["pid"] \
                    and sorted(now["partitions"]) == sorted(before["partitions"])

            wait_until(f"worker {worker} back with partitions {before['partitions']}", back)
            resumed.append(round(time.monotonic() - started, 1))
        bg.wait_replay()
        result = outcome(settings, order_ids(history, n), since)
    finally:
        supervisor.stop()
    result.assert_nothing_lost_and_copies_identical(order_ids(history, n))
    report(f"rolling_restart_{protocol}", orders=n, restarts=3, resumed_after_s=resumed,
           lost=0, duplicates=result.duplicates)


def test_partitions_added_to_payments_then_orders_while_workers_run(
        settings: Settings, live_data: Path, model_dir: Path, expected: dict) -> None:
    """payments, then orders, grow from 6 to 12 partitions while two workers score a replay
    of the live data: the workers pick up the new partitions within the metadata refresh,
    every order is scored, and every order's last revision has merge_asof's features, those
    whose payments straddle the growth (their key now hashes to another partition) too."""
    settings = settings.replace(reference_max_wait_ms=60_000, metadata_refresh_ms=2_000)
    bg = Background()
    supervisor = bg.supervise(Supervisor(settings, model_dir, None, workers=2))
    admin = make_admin(settings.connection)
    try:
        supervisor.wait_until_assigned(settings.topics.orders_partitions)
        since = int(time.time() * 1000)

        def feed() -> None:
            replay(settings, live_data, rate=1_500, progress=False)

        thread = threading.Thread(target=feed, daemon=True)
        thread.start()
        time.sleep(2.0)  # the scenario: grow while the stream runs
        for future in admin.create_partitions(
                [NewPartitions(settings.topics.topic_of("payments"), 12)]).values():
            future.result()
        time.sleep(1.0)  # only payments has grown for a second: the workers say so
        for future in admin.create_partitions(
                [NewPartitions(settings.topics.orders_topic, 12)]).values():
            future.result()
        picked_s = wait_until("the workers own the 12 orders partitions", lambda: sorted(
            p for ps in supervisor.assignments().values() for p in ps) == list(range(12)),
            timeout_s=60)
        thread.join(120)
        found = predictions(settings, set(expected), since)
    finally:
        supervisor.stop()
    assert picked_s <= 2 * settings.connection.metadata_refresh_ms / 1000 + 15
    assert set(found) == set(expected)
    assert_never_silently_wrong(found, expected)
    report("partitions_added", orders=len(expected), orders_partitions_picked_up_s=round(
        picked_s, 1))


def test_topics_created_are_in_a_new_clients_metadata_at_once(bootstrap: str) -> None:
    """CreateTopics answers once the controller has a topic; a client asking the broker right
    after was told UNKNOWN_TOPIC_OR_PART in 1 of 15 tries (a flaky test found it).
    create_topics waits for the broker's metadata."""
    import uuid

    from triage.bus.clients import create_topics, make_consumer

    unknown = []
    for _ in range(15):
        settings = Settings.of(bootstrap_servers=bootstrap,
                               orders_topic=f"fresh-{uuid.uuid4().hex[:8]}")
        create_topics(settings.connection, settings.topics,
                      reference_topic_partitions(settings.topics))
        consumer = make_consumer(settings.connection, f"g-{uuid.uuid4().hex[:8]}")
        topic = settings.topics.orders_topic
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.close()
        if meta.error is not None:
            unknown.append(meta.error.name())
    assert unknown == []
