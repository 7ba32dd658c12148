"""Real input and real faults (issue 10): each test is one kind of failure that once broke
triage, reproduced small, on a real broker and with real processes where it involves them.

This half needs a broker or starts processes; tests/unit/test_real_faults.py has the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    EXERCISE,
    TRIAGE,
    clean_env,
    cp1252_copy,
    oracle,
    run_scorer,
    small_data,
    triage,
    write_rows,
)
from triage.bus.clients import create_topics, make_producer
from triage.bus.deadletter import (
    headers_dict,
)
from triage.bus.embedded import EmbeddedBroker, free_port
from triage.bus.offsets import committed_offsets
from triage.consumer.reader import TopicReader, collect
from triage.consumer.scorer import Scorer
from triage.consumer.supervisor import Supervisor
from triage.model import artifact
from triage.model.features import FeatureBatch
from triage.model.orders import read_orders_csv
from triage.model.policy import label
from triage.model.reference import (
    ReferenceTables,
)
from triage.model.streams import reference_topic_partitions
from triage.producer.replay import replay
from triage.schemas.codec import Codec
from triage.scoring.hooks import Rejection
from triage.settings import Settings


def _env(settings: Settings, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A child process's environment: these settings (own topics, group, state dir) only."""
    return clean_env(tmp_path, **{**settings.to_env(), "TRIAGE_LOG_FORMAT": "json", **extra})


# -- 1. the demo waits for a prediction or a dead letter, whichever the record becomes -------

def test_demo_ends_when_every_row_is_a_prediction_or_a_dead_letter(
        settings: Settings, history: Path, model_dir: Path, tmp_path: Path) -> None:
    rows = small_data(history, tmp_path / "data", 300)
    rows[3][0] = ""              # empty order_id: dead-lettered as missing_field
    rows[4][0] = "O-\x01-bad"    # unprintable: invalid_field
    rows[5][2] = "yesterday"     # not a timestamp: not an order at all, skipped by line
    write_rows(tmp_path / "data" / "orders.csv", rows)

    result = subprocess.run(
        [*TRIAGE, "demo", "--data", str(tmp_path / "data"), "--model", str(model_dir),
         "--results", str(tmp_path / "results")],
        env=_env(settings, tmp_path), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "299 orders published, 297 scored" in result.stdout
    assert "missing_field              1" in result.stdout
    assert "invalid_field              1" in result.stdout
    assert "line 6: timestamp 'yesterday' is not YYYY-MM-DD HH:MM:SS" in result.stdout
    assert "agreement with offline batch scoring: 100.00%" in result.stdout
    written = [json.loads(line) for line in
               (tmp_path / "results" / "predictions.jsonl").read_text().splitlines()]
    assert [p["order_id"] for p in written] == [r[0] for r in rows[1:] if r[0] and r[2] !=
                                                "yesterday" and r[0].isprintable()]


def test_demo_on_the_original_exercise_files_follows_the_policy(
        settings: Settings, tmp_path: Path) -> None:
    """The 2021 exercise's own CSVs (CRLF, quoted, extra columns, leading zeros; 500 of its
    orders, tests/data/exercise-2021): every order is predicted as the policy over merge_asof
    features says, and the class counts are the ones its README gives."""
    result = subprocess.run(
        [*TRIAGE, "demo", "--data", str(EXERCISE), "--model", str(tmp_path / "model"),
         "--results", str(tmp_path / "results")],
        env=_env(settings, tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    predicted = {p["order_id"]: p["recommendation"] for p in map(
        json.loads, (tmp_path / "results" / "predictions.jsonl").read_text().splitlines())}

    expected = oracle(EXERCISE)
    ids = read_orders_csv(EXERCISE / "orders.csv").order_id
    policy = label(FeatureBatch(
        expected["order_hour_of_day"].to_numpy(np.int64),
        expected["inventory"].to_numpy(float),
        expected["payment_status"].to_numpy(object),
        expected["zip_code_available"].to_numpy(bool)))
    assert Counter(policy.tolist()) == {"HoldCheckDelivery": 170, "Deliver": 112,
                                        "HoldCheckAvailability": 97, "HoldCheckPayment": 85,
                                        "Decline": 36}
    assert len(predicted) == 500
    wrong = [i for i, p in zip(ids, policy.tolist(), strict=True) if predicted[i] != p]
    assert wrong == [], f"{len(wrong)} orders differ from the policy, e.g. {wrong[:3]}"


def test_a_record_too_large_to_dead_letter_as_is_does_not_stop_the_loop(
        settings: Settings, history: Path, model_dir: Path) -> None:
    """150 kB key + 880 kB value (under the 1 MiB a Java producer accepts), then 50 orders on
    the same partition: the worker dead-letters the big one without its key and scores the
    rest; it never fails."""
    good = read_orders_csv(history / "orders.csv", limit=50).records()
    producer = make_producer(settings.connection, **{"message.max.bytes": 2_000_000})
    codec = Codec("order")
    producer.produce(settings.topics.orders_topic, partition=0, key=b"K" * 150_000,
                     value=b"V" * 880_000)
    for record in good:
        producer.produce(settings.topics.orders_topic, partition=0, key=record["order_id"].encode(),
                         value=codec.encode(record))
    assert producer.flush(30) == 0

    scorer = Scorer(settings, artifact.load(model_dir), ReferenceTables.load(history))
    assert run_scorer(scorer, 51) == Counter({"oversized": 1})
    assert scorer.stats.predicted == 50
    with TopicReader(settings.connection, settings.topics.dlq_topic, None) as reader:
        ((letter, _),) = list(reader.read(idle_s=2))
    headers = headers_dict(letter.headers())
    assert letter.key() is None and letter.value() == b"V" * 880_000
    assert headers["triage.errors.original-key-bytes"] == "150000"
    assert headers["triage.errors.reason"] == "oversized"


def test_commands_refuse_a_csv_in_another_encoding_once_with_the_config_status(
        settings: Settings, history: Path, model_dir: Path, tmp_path: Path) -> None:
    data = cp1252_copy(history, tmp_path / "data")
    env = _env(settings, tmp_path)
    trained = triage("train", "--data", str(data), "--out", str(tmp_path / "m"), env=env)
    assert trained.returncode == 2 and "orders.csv is not utf-8 text: line 4" in trained.stderr
    replayed = triage("replay", str(data / "orders.csv"), env=env)
    assert replayed.returncode == 2 and "orders.csv is not utf-8" in replayed.stderr
    consumed = triage("consume", "--model", str(model_dir), "--reference", str(data), env=env)
    assert consumed.returncode == 2 and "inventory.csv is not utf-8" in consumed.stderr
    assert "worker_spawned" not in consumed.stderr  # refused once, before any worker
    worker = subprocess.run([sys.executable, "-m", "triage.consumer.worker", "--model",
                             str(model_dir), "--reference", str(data)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2, worker.stderr[-2000:]  # not restarted by its supervisor
    assert "Traceback" not in trained.stderr + replayed.stderr + consumed.stderr + worker.stderr
    assert triage("replay", str(data / "orders.csv"), "--encoding", "cp1252",
                  env=env).returncode == 0


# -- 5. the orders topic disappears and comes back ----------------------------------------

def test_workers_score_again_after_the_broker_lost_and_recreated_the_topics(
        history: Path, model_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """The embedded broker restarts empty, `topics create` runs again, orders arrive: the
    worker, which rejoined while the orders topic did not exist, says so and scores them."""
    port = free_port()
    broker = EmbeddedBroker(port=port, log_path=tmp_path / "tansu.log")
    broker.start()
    settings = Settings.of(bootstrap_servers=broker.bootstrap, orders_partitions=2,
                        output_partitions=2, metadata_refresh_ms=1000, session_timeout_ms=3000,
                        state_dir=str(tmp_path / "state"))
    create_topics(settings.connection, settings.topics, reference_topic_partitions(settings.topics))
    orders = read_orders_csv(history / "orders.csv", limit=100)

    supervisor = Supervisor(settings, model_dir, history, workers=1)
    supervisor.start()
    threading.Thread(target=supervisor.run, daemon=True).start()
    try:
        supervisor.wait_until_assigned(2)
        since = int(time.time() * 1000)
        replay(settings, history / "orders.csv", limit=50, progress=False)
        collect(settings.connection, settings.topics.predictions_topic, "prediction",
                set(orders.order_id[:50]),
                timeout_s=60, since_ms=since)

        broker.stop()
        broker = EmbeddedBroker(port=port, log_path=tmp_path / "tansu.log")
        broker.start()
        logged = ""
        deadline = time.monotonic() + 60
        # The worker says it lost the topic (librdkafka reports it missing, or the group's
        # partitions lost), while orders does not exist yet.
        while "topic_missing" not in logged and "partitions_lost" not in logged:
            assert time.monotonic() < deadline, logged[-3000:]
            time.sleep(0.2)
            logged += capfd.readouterr().err
        create_topics(settings.connection, settings.topics,
                      reference_topic_partitions(settings.topics))
        since = int(time.time() * 1000)
        replayed = replay(settings, history / "orders.csv", limit=100, progress=False)
        assert replayed.failed == 0
        found = collect(settings.connection, settings.topics.predictions_topic, "prediction",
                        set(orders.order_id), timeout_s=90, since_ms=since)
        assert set(found) == set(orders.order_id)
    finally:
        supervisor.stop()
        broker.stop()


# -- 7. a slow batch must not loop forever ----------------------------------------------------

class BlockingHook:
    """Blocks for ``seconds`` on the first batch holding the order ``SLOW``; else fast."""

    name = "blocking"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.returned = threading.Event()
        self.calls = 0

    def check(self, orders: list[dict]) -> list[Rejection]:
        self.calls += 1
        if not self.returned.is_set() and any(o["order_id"] == "SLOW" for o in orders):
            time.sleep(self.seconds)
            self.returned.set()
        return []


def test_a_hook_slower_than_max_poll_interval_dead_letters_its_orders_once(
        settings: Settings, history: Path, model_dir: Path) -> None:
    """The hook blocks for longer than max.poll.interval.ms on one order. Its batch is
    dead-lettered as `timeout` at the deadline, the worker is never evicted, nothing is
    consumed twice, and once the hook has returned later orders are scored again."""
    # 6 s: the smallest session timeout Apache Kafka accepts by default
    # (group.min.session.timeout.ms); the hook outlasts max.poll.interval.ms.
    settings = settings.replace(session_timeout_ms=6000, max_poll_interval_ms=6000,
                                processing_deadline_ms=1000, batch_size=50)
    records = read_orders_csv(history / "orders.csv", limit=200).records()
    records[10]["order_id"] = "SLOW"
    codec = Codec("order")
    producer = make_producer(settings.connection)

    def publish(batch: list[dict]) -> None:
        for r in batch:
            producer.produce(settings.topics.orders_topic, key=r["order_id"].encode(),
                             value=codec.encode(r))
        assert producer.flush(30) == 0

    hook = BlockingHook(seconds=8.0)
    scorer = Scorer(settings, artifact.load(model_dir), ReferenceTables.load(history),
                    extra_hooks=[hook])
    failure: list[BaseException] = []

    def run() -> None:
        try:
            scorer.run()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    publish(records[:100])
    thread.start()
    try:
        assert hook.returned.wait(60), "the hook never ran"
        deadline = time.monotonic() + 60
        while scorer.stats.consumed < 100:
            assert time.monotonic() < deadline and not failure, failure
            time.sleep(0.1)
        publish(records[100:])
        while scorer.stats.consumed < 200:
            assert time.monotonic() < deadline and not failure, failure
            time.sleep(0.1)
    finally:
        scorer.request_stop()
        thread.join(60)
    assert not failure, failure
    assert scorer.stats.consumed == 200  # nothing was read twice: never evicted
    assert set(scorer.stats.dead_lettered) == {"timeout"}

    with TopicReader(settings.connection, settings.topics.predictions_topic,
                     "prediction") as reader:
        predicted = [p for _, p in reader.read(idle_s=2)]
    with TopicReader(settings.connection, settings.topics.dlq_topic, None) as reader:
        letters = [headers_dict(msg.headers()) for msg, _ in reader.read(idle_s=2)]
    dead = {(int(h["__connect.errors.partition"]), int(h["__connect.errors.offset"]))
            for h in letters}
    scored = {(p["order_partition"], p["order_offset"]) for p in predicted}
    assert len(dead) + len(scored) == 200 and not dead & scored
    assert len(predicted) == len(scored)  # one prediction each
    assert {h["triage.errors.reason"] for h in letters} == {"timeout"}
    assert "SLOW" not in {p["order_id"] for p in predicted}
    assert {p["order_id"] for p in predicted} >= {r["order_id"] for r in records[100:]}
    committed = committed_offsets(settings.connection, settings.scorer.group_id,
                                  settings.topics.orders_topic)
    assert sum(offset or 0 for offset in committed.values()) == 200


# -- 8. no worker can run --------------------------------------------------------------------

def test_consume_exits_with_the_config_status_once_no_worker_can_run(
        settings: Settings, history: Path, model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    env = _env(settings, tmp_path)
    missing = triage("consume", "--model", str(model_dir), "--reference",
                     str(tmp_path / "empty"), env=env)
    assert missing.returncode == 2 and "inventory.csv does not exist" in missing.stderr
    # A setting only a worker can check (its hooks): both workers stop with status 2, and so
    # does the command, instead of idling with none.
    bad_hook = triage("consume", "--workers", "2", "--model", str(model_dir), "--reference",
                      str(history), env={**env, "TRIAGE_HOOKS": "no_such_module:make"},
                      timeout=120)
    assert bad_hook.returncode == 2, bad_hook.stderr[-2000:]
    assert bad_hook.stderr.count("worker_config_error") >= 2
    assert "every worker stopped with a configuration error" in bad_hook.stderr


# -- 9. orphan workers ---------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    with contextlib.suppress(FileNotFoundError):
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(c) for c in text.split()]
    return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_workers_stop_when_their_supervisor_is_killed(
        settings: Settings, history: Path, model_dir: Path, tmp_path: Path) -> None:
    consume = subprocess.Popen(
        [*TRIAGE, "consume", "--workers", "2", "--model", str(model_dir), "--reference",
         str(history)], env=_env(settings, tmp_path), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(workers := _children(consume.pid)) < 2:
            assert time.monotonic() < deadline and consume.poll() is None
            time.sleep(0.1)
    finally:
        consume.kill()
        consume.wait()
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in workers):
        if time.monotonic() > deadline:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            pytest.fail(f"workers {workers} outlived their supervisor by 60 s")
        time.sleep(0.2)


# -- 10. the embedded broker's port --------------------------------------------------------

def test_broker_refuses_a_port_another_broker_listens_on(tmp_path: Path) -> None:
    with EmbeddedBroker(log_path=tmp_path / "other.log") as other:
        result = subprocess.run([*TRIAGE, "broker", "--port", str(other.port)],
                                env=clean_env(tmp_path), capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 2
    assert f"port {other.port} on 127.0.0.1 is already in use" in result.stderr
    assert "listening" not in result.stdout
    assert not (tmp_path / "broker.json").exists()


def test_drift_report_says_how_many_samples_wait_in_the_open_window(
        settings: Settings, tmp_path: Path) -> None:
    codec = Codec("drift_sample")
    producer = make_producer(settings.connection)
    for i in range(40):
        producer.produce(settings.topics.drift_topic, key=b"k", value=codec.encode({
            "order": {"order_id": f"O-{i}", "customer_id": "C", "timestamp_ms": 0,
                      "sku_code": "S", "zip_code": "1"},
            "features": {"order_hour_of_day": 1, "inventory": 1.0, "payment_status": "OK",
                         "zip_code_available": True},
            "recommendation": "Deliver", "probabilities": {}, "model_version": "v",
            "scored_at_ms": 0}))
    assert producer.flush(30) == 0
    result = triage("drift", "report", "--out", str(tmp_path / "r.html"), "--idle", "1",
                    env=_env(settings, tmp_path))
    assert result.returncode == 0, result.stderr
    assert "40 sample(s) on " in result.stdout and "closes at 1,000 samples" in result.stdout
    assert "40 sample(s) on " in (tmp_path / "r.html").read_text()
