"""A worker owning no partition says why (consumer/groupwatch.py): found by a new user, whose
restarted group logged ``group_join_started`` and then ``progress consumed 0`` for minutes.

On both brokers: a member of the group that stops polling holds a rebalance up to its
``max.poll.interval.ms`` while the partitions it must give up are owned by nobody; the worker
joining then says so within 2 x its session timeout, and scores once the member is gone (on
Apache Kafka from the group's description, on the embedded broker, which lists no members,
from the group's stalled commits). And a worker idle because the group has more members than
partitions is told apart: no warning.

This half needs a broker or starts processes; tests/unit/test_group_watch.py has the rest.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer
from structlog.testing import capture_logs

from tests.helpers import EMBEDDED, Broker
from triage.bus.clients import consumer_config, create_topics
from triage.consumer.loop import BatchLoop
from triage.model.streams import reference_topic_partitions
from triage.producer.publisher import OrderPublisher, order_record
from triage.settings import Settings


def _published(settings: Settings, n: int) -> None:
    publisher = OrderPublisher(settings.connection, settings.topics.orders_topic)
    for i in range(n):
        publisher.publish(order_record(f"O-{i}", "C", "S", "1", "2026-01-05 10:00:00"))
    assert publisher.flush(30) == 0


def _run(loop: BatchLoop, seen: list[Any]) -> threading.Thread:
    thread = threading.Thread(target=loop.run, args=(lambda records: seen.extend(records)
                                                     or [],), daemon=True)
    thread.start()
    return thread


def _wait_for(logs: list[dict[str, Any]], event: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in logs if e["event"] == event]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {event} in {timeout_s} s: {[e['event'] for e in logs]}")


@pytest.mark.parametrize("on", ["broker", pytest.param("embedded", marks=pytest.mark.embedded)])
def test_a_worker_held_out_by_a_member_that_stopped_polling_says_so_and_then_scores(
        on: str, settings: Settings, tmp_path: Path) -> None:
    settings = settings.replace(orders_topic=f"watch-{uuid.uuid4().hex[:8]}",
                                orders_partitions=2)
    create_topics(settings.connection, settings.topics, reference_topic_partitions(settings.topics))
    _published(settings, 20)
    stuck = Consumer(consumer_config(settings.connection, settings.scorer.group_id,
                                     **{"max.poll.interval.ms": 120_000}))
    stuck.subscribe([settings.topics.orders_topic])
    deadline = time.monotonic() + 60
    while not stuck.assignment() and time.monotonic() < deadline:
        stuck.poll(0.2)
    assert len(stuck.assignment()) == 2
    seen: list[Any] = []
    with capture_logs() as logs:
        loop = BatchLoop(settings.connection, settings.scorer, settings.topics.orders_topic)
        thread = _run(loop, seen)
        try:
            # the member polls no more: the rebalance the worker's join starts waits for it
            # (when: 2 x the session timeout, as the fake clock's test above shows)
            warned = _wait_for(logs, "partitions_unowned", 40)
            assert warned["unowned"] or warned["group_state"] != "STABLE"
            assert seen == [] and not [e for e in logs if e["event"] == "partitions_assigned"
                                       and e["partitions"]]
            stuck.close()  # the member leaves: the worker takes its partitions
            deadline = time.monotonic() + 90
            while len(seen) < 20 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(seen) == 20, [(e["event"], e.get("partitions"), e.get("unowned"))
                                     for e in logs]
        finally:
            loop.request_stop()
            thread.join(30)


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_a_worker_idle_because_the_group_has_more_members_than_partitions_warns_nothing(
        protocol: str, settings: Settings, broker: Broker) -> None:
    """Under both group protocols (KIP-848's ``consumer``: the broker assigns, its states are
    described as the classic ones)."""
    if protocol == "consumer" and broker.kind == EMBEDDED:
        pytest.skip("KIP-848 needs Apache Kafka (make venv fetches it; Java 17+)")
    settings = settings.replace(orders_topic=f"idle-{uuid.uuid4().hex[:8]}", orders_partitions=1,
                                group_protocol=protocol)
    create_topics(settings.connection, settings.topics, reference_topic_partitions(settings.topics))
    loops = [BatchLoop(settings.connection, settings.scorer, settings.topics.orders_topic,
                       worker_id=str(i)) for i in range(2)]
    with capture_logs() as logs:
        threads = [_run(loop, []) for loop in loops]
        try:
            _wait_for(logs, "idle_no_partition", 60)
            assert not [e for e in logs if e["event"] == "partitions_unowned"]
        finally:
            for loop in loops:
                loop.request_stop()
            for thread in threads:
                thread.join(30)
