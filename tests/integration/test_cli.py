"""The command line as a person uses it: real processes, the real embedded broker.

This half needs a broker or starts processes; tests/unit/test_cli.py has the rest."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import TRIAGE, clean_env, triage
from triage.bus.embedded import BrokerNotFound, resolve_bootstrap, write_state
from triage.model.streams import reference_topic_partitions
from triage.settings import Settings


def test_broker_resolution_order(tmp_path: Path) -> None:
    assert resolve_bootstrap("flag:1", str(tmp_path)) == "flag:1"
    with pytest.raises(BrokerNotFound, match="triage broker"):
        resolve_bootstrap("", str(tmp_path))
    write_state(str(tmp_path), "127.0.0.1:1234", os.getpid())
    assert resolve_bootstrap("", str(tmp_path)) == "127.0.0.1:1234"
    assert resolve_bootstrap("flag:1", str(tmp_path)) == "flag:1"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_state(str(tmp_path), "127.0.0.1:1234", dead.pid)  # a stale file is ignored
    with pytest.raises(BrokerNotFound):
        resolve_bootstrap("", str(tmp_path))


def test_commands_without_a_broker_say_how_to_start_one(tmp_path: Path) -> None:
    result = triage("topics", "create", env=clean_env(tmp_path))
    assert result.returncode == 2
    assert "triage broker" in result.stderr and "TRIAGE_BOOTSTRAP_SERVERS" in result.stderr


@pytest.mark.parametrize("kind", [[], ["--kafka"]], ids=["embedded", "apache-kafka"])
def test_broker_command_is_found_by_other_commands_and_stops_cleanly(
        kind: list[str], tmp_path: Path) -> None:
    """`triage broker` (tansu) and `triage broker --kafka` (Apache Kafka from Maven's jars)."""
    if kind:
        from triage.bus.apache_kafka import unavailable_reason

        reason = unavailable_reason()
        if reason:
            pytest.skip(reason)
    env = clean_env(tmp_path, TMPDIR=str(tmp_path))
    errors = open(tmp_path / "stderr.txt", "w+")  # noqa: SIM115 -- closed below
    broker = subprocess.Popen([*TRIAGE, "broker", *kind], env=env, stdout=subprocess.PIPE,
                              stderr=errors, text=True)
    try:
        line = broker.stdout.readline()  # printed once the broker answers metadata requests
        if not line:
            broker.wait(60)
            logs = [p.read_text()[-3000:] for p in tmp_path.glob("*.log")]
            errors.seek(0)
            pytest.fail(f"exit {broker.returncode}: {errors.read()[-3000:]} {logs}")
        assert "listening on 127.0.0.1:" in line, line
        state = json.loads((tmp_path / "broker.json").read_text())
        assert state["pid"] == broker.pid and state["bootstrap"] in line

        created = triage("topics", "create", "--orders-partitions", "3", env=env)
        assert created.returncode == 0, created.stderr
        assert "orders: created (3 partitions)" in created.stdout
        again = triage("topics", "create", env=env)
        assert "orders: exists" in again.stdout and again.returncode == 0

        produced = triage("produce", "--order-id", "O-1", "--customer-id", "C-1", "--sku",
                          "SKU-1", "--zip", "10001", "--timestamp", "2026-01-05 10:00:00",
                          env=env)
        assert produced.returncode == 0, produced.stderr
        assert "published order O-1 to orders partition" in produced.stdout
    finally:
        broker.send_signal(signal.SIGTERM)
        code = broker.wait(timeout=40)
        errors.close()
    assert code == 0
    assert not (tmp_path / "broker.json").exists()
    assert not list(tmp_path.glob("triage-kafka-*"))  # Apache Kafka's data went with it


def _children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (Linux's /proc: each thread lists those it forked; a
    thread ending meanwhile, such as a librdkafka one, has none)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting to be reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="a child dies with its parent on Linux only (PR_SET_PDEATHSIG)")
@pytest.mark.parametrize("kind", [[], ["--kafka"]], ids=["embedded", "apache-kafka"])
def test_a_killed_broker_command_takes_its_broker_with_it(kind: list[str],
                                                          tmp_path: Path) -> None:
    """SIGKILL of `triage broker` (no cleanup of ours runs) must not leave its broker
    process running on the port, as it did."""
    from triage.bus.embedded import port_in_use

    if kind:
        from triage.bus.apache_kafka import unavailable_reason

        reason = unavailable_reason()
        if reason:
            pytest.skip(reason)
    env = clean_env(tmp_path, TMPDIR=str(tmp_path))
    broker = subprocess.Popen([*TRIAGE, "broker", *kind], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    children: list[int] = []
    try:
        line = broker.stdout.readline()  # printed once the broker answers metadata requests
        assert "listening on 127.0.0.1:" in line, (line, broker.poll())
        port = int(line.split("listening on 127.0.0.1:")[1].split(";")[0])
        children = _children(broker.pid)
        assert children and all(_alive(pid) for pid in children)
        assert port_in_use(port)
        broker.kill()
        broker.wait(timeout=10)
        deadline = time.monotonic() + 30
        while (any(_alive(pid) for pid in children) or port_in_use(port)) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], "the broker outlived its parent"
        assert not port_in_use(port)
        if kind:  # its data directory outlives it, until the next start sweeps it away
            from triage.bus.apache_kafka import remove_orphaned_data

            left = list(tmp_path.glob("triage-kafka-*"))
            assert len(left) == 1 and remove_orphaned_data(tmp_path, quiet_s=0) == left
            assert not left[0].exists()
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait()
        for pid in [pid for pid in children if _alive(pid)]:  # nor past this test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_only_data_directories_of_owners_that_are_gone_are_removed(tmp_path: Path) -> None:
    """Apache Kafka's data and the supervisor's status directories (bus/tempdirs.py)."""
    from triage.bus.apache_kafka import remove_orphaned_data
    from triage.bus.tempdirs import OWNER_FILE

    ended = subprocess.Popen(["true"])
    ended.wait()
    orphan, running, foreign = (tmp_path / f"triage-kafka-{n}" for n in ("a", "b", "c"))
    for path, owner in ((orphan, ended.pid), (running, os.getpid()), (foreign, None)):
        path.mkdir()
        if owner is not None:
            (path / OWNER_FILE).write_text(str(owner))
    assert remove_orphaned_data(tmp_path) == []  # just written: maybe still in use
    assert remove_orphaned_data(tmp_path, quiet_s=0) == [orphan]
    assert running.exists() and foreign.exists() and not orphan.exists()


def test_apache_kafka_without_java_says_what_to_install(tmp_path: Path) -> None:
    result = triage("broker", "--kafka", env=clean_env(tmp_path,
                                                       JAVA_HOME=str(tmp_path / "no-jdk")))
    assert result.returncode == 2, result.stderr
    assert "needs Java 17 or later" in result.stderr and "install" in result.stderr
    assert "Traceback" not in result.stderr


def test_produce_rejects_a_bad_timestamp_before_connecting(tmp_path: Path) -> None:
    result = triage("produce", "--order-id", "O-1", "--customer-id", "C-1", "--sku", "S",
                    "--zip", "1", "--timestamp", "yesterday",
                    env=clean_env(tmp_path, TRIAGE_BOOTSTRAP_SERVERS="127.0.0.1:9"))
    assert result.returncode == 2 and "not YYYY-MM-DD HH:MM:SS" in result.stderr


@pytest.mark.embedded
def test_demo_reports_full_agreement(settings: Settings, tmp_path: Path) -> None:
    """What `make demo` runs, from a directory with nothing in it yet, on the embedded broker
    as `make demo` does (on topics of its own: the broker is shared with other tests)."""
    env = clean_env(tmp_path / "state", **{**settings.to_env(), "TRIAGE_LOG_FORMAT": "json",
                                           "TRIAGE_STATE_DIR": str(tmp_path / "state")})
    result = subprocess.run([*TRIAGE, "demo"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "agreement with offline batch scoring: 100.00%" in result.stdout
    # With JSON logs, stderr is a log: every line JSON (no librdkafka line, no progress bar).
    not_json = []
    for line in result.stderr.replace("\r", "\n").splitlines():
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not not_json, not_json[:5]
    assert "wrong without a flag or a correction: 0\n" in result.stdout
    lines = (tmp_path / "results" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 20_000
    assert {json.loads(line)["recommendation"] for line in lines} == {
        "Deliver", "HoldCheckAvailability", "HoldCheckDelivery", "HoldCheckPayment", "Decline"}


def test_lag_command_reports_committed_end_and_lag_per_partition(bootstrap: str,
                                                                 tmp_path: Path) -> None:
    from triage.bus.clients import create_topics
    from triage.producer.publisher import OrderPublisher, order_record

    settings = Settings.of(bootstrap_servers=bootstrap, orders_topic=f"lag-{tmp_path.name}",
                        orders_partitions=2, state_dir=str(tmp_path))
    create_topics(settings.connection, settings.topics, reference_topic_partitions(settings.topics))
    publisher = OrderPublisher(settings.connection, settings.topics.orders_topic)
    for i in range(30):
        publisher.publish(order_record(f"O-{i}", "C", "S", "1", "2026-01-05 10:00:00"))
    assert publisher.flush(30) == 0
    result = triage("lag", "--group", "nobody-yet", env=clean_env(
        tmp_path, TRIAGE_BOOTSTRAP_SERVERS=bootstrap,
        TRIAGE_ORDERS_TOPIC=settings.topics.orders_topic))
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    ends = {int(row[0]): int(row[2]) for row in rows[:-1]}
    assert ends == publisher.end_offsets  # from delivery reports, not from the broker
    assert all(row[1] == "-" and row[2] == row[3] for row in rows[:-1])  # nothing committed
    assert rows[-1] == ["total", "30", "30"]


@pytest.mark.parametrize("command", [
    ["drift", "monitor", "--metrics-port", "{port}"],
    ["worker", "--metrics-port", "{port}"],
    ["serve", "--port", "{port}"],
    ["broker", "--port", "{port}"],
], ids=["drift-monitor", "worker", "serve", "broker"])
def test_a_command_told_to_listen_on_a_busy_port_exits_2_naming_it(
        command: list[str], settings: Settings, model_dir: Path, history: Path,
        tmp_path: Path) -> None:
    """Found by a new user: the drift monitor printed a traceback, the worker an
    `Address already in use` without the port, `triage serve` logged `gateway_serving` and
    exited 3."""
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [a.format(port=port) for a in command]
        if command[0] != "broker":
            args += ["--model", str(model_dir)] + (["--reference", str(history)]
                                                     if command[0] == "serve" else [])
        result = triage(*args, env=clean_env(tmp_path, **{**settings.to_env(),
                                                           "TRIAGE_STATE_DIR": str(tmp_path)}),
                        timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert f"port {port}" in result.stderr and "already in use" in result.stderr
    assert "Traceback" not in result.stderr and "gateway_serving" not in result.stderr


def test_an_unknown_flag_gets_its_subcommands_usage_and_the_closest_flag(tmp_path: Path
                                                                         ) -> None:
    """Found by a new user: `consume --wokers 2` printed the top level's usage."""
    result = triage("consume", "--wokers", "2", "--model", "m", env=clean_env(tmp_path))
    assert result.returncode == 2
    assert "usage: triage consume" in result.stderr
    assert "--wokers: did you mean --workers?" in result.stderr


def test_a_misspelt_setting_is_warned_of_and_the_command_goes_on() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    result = subprocess.run([sys.executable, "-m", "triage.cli", "settings"],
                            env={**env, "TRIAGE_BACH_SIZE": "100"}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert "warning: TRIAGE_BACH_SIZE is not a setting and is ignored (did you mean " \
           "TRIAGE_BATCH_SIZE?)" in result.stderr
