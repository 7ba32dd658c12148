"""Ctrl-C in a long command stops cleanly with a summary, and a command that publishes nothing
because every row was refused says so and exits non-zero: real processes, a real broker.

Found by a new user: Ctrl-C during ``triage replay`` printed ``SystemError: <method 'poll' of
'cimpl.Producer' objects> returned NULL without setting an exception`` in 3 of 10 tries and in
the other 7 exited 130 without a word of how much was sent; a replay of a file whose every row
was refused exited 0 having published nothing.

This half needs a broker or starts processes; tests/unit/test_interrupt.py has the rest.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import prediction
from triage.bus.embedded import free_port
from triage.bus.offsets import watermarks
from triage.consumer.reader import TopicReader
from triage.settings import Settings

from .test_cli import TRIAGE, clean_env, triage


def _on_topic(settings: Settings, topic: str) -> int:
    return sum(high - low for low, high in watermarks(settings.connection, topic).values())


def _interrupted(args: list[str], env: dict[str, str], ready: callable) -> subprocess.Popen:
    """Start ``triage *args``, wait until ``ready()`` (polled), send SIGINT; the process."""
    process = subprocess.Popen([*TRIAGE, *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "never got going"
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    return process


def test_ctrl_c_during_a_replay_says_what_was_sent_and_the_resumed_replays_miss_nothing(
        settings: Settings, history: Path, tmp_path: Path) -> None:
    """Interrupted twice and resumed with the printed command each time: every order of the
    file is on the topic exactly once."""
    with (history / "orders.csv").open() as f:
        ids = [row["order_id"] for row in csv.DictReader(f)][:1500]
    orders = tmp_path / "orders.csv"
    with (history / "orders.csv").open() as f:
        orders.write_text("".join(f.readline() for _ in range(len(ids) + 1)))
    env = clean_env(tmp_path, **settings.to_env())
    topic = settings.topics.orders_topic
    command = ["replay", str(orders), "--rate", "200", "--no-progress"]
    for _ in range(2):
        before = _on_topic(settings, topic)
        process = _interrupted(command, env, lambda b=before: _on_topic(settings, topic) > b)
        out, err = process.communicate(timeout=90)
        assert process.returncode == 130, (out, err)
        assert "Traceback" not in err and "SystemError" not in err
        assert "interrupted (SIGINT) after handing" in out
        resume = [line for line in err.splitlines() if line.startswith("resume with: ")]
        assert len(resume) == 1, err
        command = resume[0].removeprefix("resume with: triage ").split()  # python -m
    finished = triage(*command, env=env, timeout=120)
    assert finished.returncode == 0, finished.stderr
    with TopicReader(settings.connection, topic, "order") as reader:
        seen = [record["order_id"] for _, record in reader.read(idle_s=3.0)]
    assert sorted(seen) == sorted(ids)


def test_a_replay_whose_every_row_is_refused_exits_2_and_says_nothing_was_published(
        settings: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "orders.csv"
    bad.write_text("order_id,customer_id,sku_code,zip_code,timestamp\n"
                   "O-1,C-1,S-1,1000,yesterday\nO-2,C-2,S-2,1000,31/12/2021 10:00\n")
    result = triage("replay", str(bad), "--no-progress",
                    env=clean_env(tmp_path, **settings.to_env()))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "every row" in result.stderr and "nothing was published" in result.stderr
    assert "line 2" in result.stdout and "line 3" in result.stdout
    assert _on_topic(settings, settings.topics.orders_topic) == 0


def test_ctrl_c_while_following_predictions_ends_with_the_per_class_summary(
        settings: Settings, tmp_path: Path) -> None:
    from triage.producer.publisher import RecordPublisher

    env = clean_env(tmp_path, **settings.to_env())
    publisher = RecordPublisher(settings.connection, settings.topics.predictions_topic,
                                "prediction", "order_id")
    for i, label in enumerate(["Deliver", "Deliver", "Decline"]):
        publisher.publish(prediction(f"O-{i}", label))
    assert publisher.flush(30) == 0
    out_file = tmp_path / "p.jsonl"
    process = _interrupted(["predictions", "--follow", "--out", str(out_file)], env,
                           lambda: out_file.exists() and len(
                               out_file.read_text().splitlines()) == 3)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, (out, err)
    assert "Traceback" not in err
    assert sorted(json.loads(line)["order_id"] for line in out_file.read_text().splitlines()
                  ) == ["O-0", "O-1", "O-2"]
    assert f"3 predictions of 3 orders written to {out_file}: Deliver 2, Decline 1" in err


def test_predictions_of_one_order_its_latest_revision_on_stdout_and_the_summary_on_stderr(
        settings: Settings, tmp_path: Path) -> None:
    """A new user grepped 23k lines for one order; stdout stays pure JSON lines."""
    from triage.producer.publisher import RecordPublisher

    publisher = RecordPublisher(settings.connection, settings.topics.predictions_topic,
                                "prediction", "order_id")
    for record in (prediction("O-1", "Deliver"), prediction("O-2", "Decline"),
                   prediction("O-1", "HoldCheckPayment", revision=2, expired=True,
                              reason="late_reference:payments")):
        publisher.publish(record)
    assert publisher.flush(30) == 0
    from confluent_kafka import Producer

    from triage.bus.deadletter import HEADER_PREFIX, REASON_HEADER

    letters = Producer({"bootstrap.servers": settings.connection.bootstrap_servers})
    letters.produce(settings.topics.dlq_topic, key=b"O-4", value=b"x", headers=[
        (REASON_HEADER, b"missing_field"),
        (HEADER_PREFIX + "exception.message", b"sku_code is empty")])
    assert letters.flush(30) == 0
    result = triage("predictions", "--order-id", "O-1", "--order-id", "O-3", "--order-id",
                    "O-4", env=clean_env(tmp_path, **settings.to_env()))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["order_id"], r["revision"], r["recommendation"]) for r in lines] == [
        ("O-1", 2, "HoldCheckPayment")]
    assert "1 prediction of 1 order: HoldCheckPayment 1; 1 corrected after late reference " \
        "events (revision > 1); 1 flagged reference_wait_expired" in result.stderr
    assert "no prediction (yet) of O-3, nor a dead letter" in result.stderr
    assert f"O-4 was dead-lettered on {settings.topics.dlq_topic}: missing_field: sku_code " \
        "is empty" in result.stderr


def test_ctrl_c_during_the_demo_says_how_far_it_got_and_leaves_no_worker_running(
        settings: Settings, history: Path, model_dir: Path, tmp_path: Path) -> None:
    """The demo's workers are its children: stopped with it, not left scoring."""
    import shutil

    env = clean_env(tmp_path, **settings.to_env())
    model = tmp_path / "model"  # a path of this test's own, for pgrep
    shutil.copytree(model_dir, model)
    process = subprocess.Popen([*TRIAGE, "demo", "--data", str(history), "--model",
                                str(model), "--results", str(tmp_path / "results")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path)
    assert process.stdout is not None
    for line in process.stdout:  # the workers own the partitions and the replay has begun
        if line.startswith("replaying "):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (out, err[-3000:])
    assert "Traceback" not in err and "SystemError" not in err
    assert "interrupted (SIGINT) while" in err and "are stopped" in err
    left = subprocess.run(["pgrep", "-f", f"triage.consumer.worker.*{model}"],
                          capture_output=True, text=True)
    assert left.stdout == "", "a worker of the demo is still running"


def test_a_replay_skipping_past_the_end_is_not_called_refused(
        settings: Settings, tmp_path: Path) -> None:
    """Some rows refused, none left after --skip: nothing to send, not 'every row refused'."""
    data = tmp_path / "orders.csv"
    data.write_text("order_id,customer_id,sku_code,zip_code,timestamp\n"
                    "O-1,C-1,S-1,1000,2026-01-05 10:00:00\nO-2,C-2,S-2,1000,yesterday\n")
    result = triage("replay", str(data), "--skip", "5", "--no-progress",
                    env=clean_env(tmp_path, **settings.to_env()))
    assert result.returncode == 0, result.stderr
    assert "sent 0" in result.stdout and "every row" not in result.stderr


def test_sigterm_while_produce_waits_for_its_next_line_flushes_and_says_so(
        settings: Settings, tmp_path: Path) -> None:
    env = clean_env(tmp_path, **settings.to_env())
    process = subprocess.Popen([*TRIAGE, "produce", "--stdin"], env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdin is not None
    process.stdin.write(json.dumps({"order_id": "T-1", "customer_id": "C", "sku_code": "S",
                                    "zip_code": "1", "timestamp": "2026-01-05 10:00:00"})
                        + "\n")
    process.stdin.flush()
    deadline = time.monotonic() + 60
    while _on_topic(settings, settings.topics.orders_topic) == 0:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # stdin still open: it waits for a line
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, (out, err)
    assert "published 1, failed 0, refused 0" in err and "interrupted (SIGTERM)" in err


@pytest.mark.embedded
def test_reading_to_the_end_reads_every_record_on_the_embedded_broker(
        settings: Settings) -> None:
    """The end came from ListOffsets, which the embedded broker answers with the last batch's
    base offset + 1: a read to the end of 3,000 records in one batch stopped at 1,000 (found in
    review), and `triage predictions --order-id` could miss an order that was there."""
    from confluent_kafka import Producer

    from triage.consumer.reader import TopicReader

    topic = settings.topics.dlq_topic
    producer = Producer({"bootstrap.servers": settings.connection.bootstrap_servers,
                         "linger.ms": 1000, "partitioner": "murmur2_random"})
    for i in range(3000):
        producer.produce(topic, key=b"same-partition", value=str(i).encode())
    assert producer.flush(30) == 0
    with TopicReader(settings.connection, topic, None) as reader:
        read = [msg.value() for msg, _ in reader.read(until_end=True, idle_s=30.0)]
    assert len(read) == 3000


def test_sigterm_to_a_worker_still_starting_ends_it_at_once_with_status_0(
        tmp_path: Path, model_dir: Path) -> None:
    """Brokers that do not answer keep a starting worker inside a client call (10 s each, about
    five of them before the batch loop); the stop is not held back until they return, and the
    worker does not carry on starting (found as test_security's worker outliving the 90 s its
    supervisor waits, under load)."""
    metrics_port, unreachable = free_port(), free_port()  # nothing listens on the second
    env = clean_env(tmp_path, TRIAGE_BOOTSTRAP_SERVERS=f"127.0.0.1:{unreachable}",
                    TRIAGE_METRICS_PORT=str(metrics_port))
    worker = subprocess.Popen([*TRIAGE, "worker", "--model", str(model_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert worker.stdout is not None
    for line in worker.stdout:  # serving metrics, then asking the brokers for the backlog
        if "metrics_serving" in line:
            break
    worker.send_signal(signal.SIGTERM)
    rest, _ = worker.communicate(timeout=60)
    events = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
    assert worker.returncode == 0, rest
    assert [e["event"] for e in events] == ["stop_requested"], rest
    assert events[0]["reason"] == "SIGTERM" and events[0]["during"] == "startup"
