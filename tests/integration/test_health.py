"""/healthz, /readyz and /metrics (bus/health.py) over real HTTP: the Health state on its own,
then real workers (``triage worker``, one process each, as in a Kubernetes pod) on the broker:
not ready before they join their consumer group, ready after, still ready when they own no
partition, and not healthy once their loop is stuck (a hook freezes the loop's thread on
SIGUSR1 while the server's thread goes on).

This half needs a broker or starts processes; tests/unit/test_health.py has the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import TRIAGE, get, wait_for
from triage.bus.clients import create_topics, make_admin
from triage.bus.embedded import free_port
from triage.consumer.supervisor import worker_env
from triage.model.streams import reference_topic_partitions
from triage.settings import Settings


def metric(port: int, name: str) -> float | None:
    """The value of an unlabelled metric ``name`` on ``port``'s /metrics."""
    status, text = get(port, "/metrics")
    if status != 200:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


@contextmanager
def worker(settings: Settings, model_dir: Path, port: int, log: Path,
           **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """``triage worker`` with /metrics, /healthz and /readyz on ``port``; killed on the way out."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*TRIAGE, "worker", "--model", str(model_dir), "--metrics-port", str(port)],
            env={**worker_env(settings), "TRIAGE_LOG_FORMAT": "json", **env},
            stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_workers_are_ready_once_joined_even_without_partitions_and_unhealthy_when_stuck(
        settings: Settings, model_dir: Path, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    # One partition for two workers: one of them owns nothing (payments co-partitioned).
    settings = settings.replace(orders_topic=f"orders-one-{run}",
                                payments_topic=f"payments-one-{run}", orders_partitions=1)
    create_topics(settings.connection, settings.topics, reference_topic_partitions(settings.topics))
    stuck_env = {"TRIAGE_HOOKS": "tests.hooks:FreezeOnSignal",
                 "TRIAGE_PROCESSING_DEADLINE_MS": "500", "TRIAGE_DELIVERY_TIMEOUT_MS": "1000",
                 "TRIAGE_HEALTH_STALL_MS": "2000",
                 "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    a_port, b_port = free_port(), free_port()
    with worker(settings, model_dir, a_port, tmp_path / "a.log", **stuck_env) as a:
        answers: list[tuple[int, dict[str, Any]]] = []

        def ready() -> bool:
            status, body = get(a_port, "/readyz")
            if status:
                answers.append((status, json.loads(body)))
            return status == 200

        wait_for("worker a ready", ready, a)
        # It answered before it was ready, and said what it was waiting for, the group join
        # among it (how long the join takes is the broker's: seconds on one with an initial
        # rebalance delay, almost nothing on the test cluster's Apache Kafka).
        assert answers[0][0] == 503, answers[:3]
        assert all(body["status"] == "not_ready" for status, body in answers if status == 503)
        assert any("group_joined" in body["waiting_for"] for _, body in answers), answers
        assert get(a_port, "/healthz")[0] == 200
        wait_for("a owns the partition", lambda: metric(a_port, "triage_owned_partitions") == 1)
        # The join began before the model and the tables were loaded, so it overlapped them;
        # the first assignment says how long it took.
        events = [json.loads(line) for line in (tmp_path / "a.log").read_text().splitlines()
                  if line.startswith("{")]
        names = [e["event"] for e in events]
        assert names.index("group_join_started") < names.index("worker_starting"), names
        assert next(e for e in events if e["event"] == "partitions_assigned")["join_ms"] > 0

        with worker(settings, model_dir, b_port, tmp_path / "b.log") as b:
            wait_for("worker b ready", lambda: get(b_port, "/readyz")[0] == 200, b)
            wait_for("one owner of the one partition", lambda: sorted(
                (metric(a_port, "triage_owned_partitions"),
                 metric(b_port, "triage_owned_partitions"))) == [0, 1])
            assert get(a_port, "/readyz")[0] == get(b_port, "/readyz")[0] == 200

            os.kill(a.pid, signal.SIGUSR1)  # a's loop thread blocks for good
            wait_for("a reported stalled", lambda: get(a_port, "/healthz")[0] == 503, a,
                     timeout_s=30)
            assert json.loads(get(a_port, "/healthz")[1])["status"] == "stalled"
            assert get(b_port, "/healthz")[0] == 200

            b.send_signal(signal.SIGTERM)
            assert b.wait(30) == 0  # a worker's exit status after a requested stop


def test_worker_command_refuses_a_bad_model_with_status_2(tmp_path: Path,
                                                          settings: Settings) -> None:
    result = subprocess.run([*TRIAGE, "worker", "--model", str(tmp_path / "missing")],
                            env=worker_env(settings), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert "missing" in result.stderr and "Traceback" not in result.stderr


def test_a_worker_counts_the_reference_backlog_it_decides_its_join_on(
        settings: Settings) -> None:
    """records_in (what a worker asks before joining early, consumer/worker.py): the records
    between the watermarks of every partition of the topics named; a missing topic counts 0."""
    from triage.bus.clients import make_consumer, records_in
    from triage.model.streams import INVENTORY
    from triage.producer.publisher import reference_publisher

    stock = reference_publisher(INVENTORY, settings.connection,
                                settings.topics.topic_of("inventory"))
    for i in range(37):  # one record a produce request: tansu's ListOffsets(latest), which
        stock.publish({"sku_code": f"SKU-{i}", "timestamp_ms": 1_700_000_000_000 + i,
                       "inventory": 3.0})  # the watermark query uses, counts batches
        stock.producer.flush(30)
    consumer = make_consumer(settings.connection, f"triage-test-{uuid.uuid4().hex}")
    try:
        assert records_in(consumer, [settings.topics.topic_of("inventory"),
                                     settings.topics.topic_of("zip_codes")]) == 37
        assert records_in(consumer, [f"no-such-topic-{uuid.uuid4().hex}"]) == 0
    finally:
        consumer.close()


def test_a_worker_and_the_stage_without_their_topics_exit_2_naming_them_and_create_none(
        model_dir: Path, settings: Settings) -> None:
    """Started before `triage topics create`: a worker restarted forever on
    UNKNOWN_TOPIC_OR_PART, and its metadata requests for the orders topic by name had a broker
    with auto-creation make it with its own partition count (a new user's trial found 4 beside
    reference topics of 6; `triage consume` asked for it by name first). All three now exit 2
    at once, naming the topics and the command."""
    absent = f"orders-absent-{uuid.uuid4().hex[:8]}"
    missing = settings.replace(orders_topic=absent, windows_topic_prefix=f"{absent}-windows",
                               windowed_features_topic=f"{absent}-windowed")
    for command in (["worker", "--model", str(model_dir)],
                    ["consume", "--workers", "1", "--model", str(model_dir)], ["windows"]):
        result = subprocess.run([*TRIAGE, *command], env=worker_env(missing),
                                capture_output=True, text=True, timeout=90)
        assert result.returncode == 2, result.stderr[-2000:]
        assert absent in result.stderr and "triage topics create" in result.stderr
        assert "Traceback" not in result.stderr
    assert f"{absent}-windows.customer_id-changelog" in result.stderr  # every one it needs
    admin = make_admin(settings.connection)
    assert not [t for t in admin.list_topics(timeout=10).topics if t.startswith(absent)]
