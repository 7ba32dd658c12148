"""The drift monitor end to end on a real broker: orders -> scorer -> drift topic -> monitor ->
reports topic, /metrics and logs, then ``triage drift report`` and ``triage drift monitor`` as
commands.

Phase 1 replays 2,000 of the training orders (shuffled, so a window is a sample of the whole
period, as the baseline is), scored against the unshifted reference data. Phase 2 replays
2,000 other orders of the same history after a zip roll-back (``generate(..., shift=
"zip-rollback")`` changes only zip_codes.csv), scored by a scorer started on that reference
data. Every order is sampled; each phase is one window of 2,000 samples, read by the monitor
before the next phase starts, so the windows do not mix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.helpers import SettingsFactory
from triage.bus.clients import create_topics
from triage.bus.embedded import free_port
from triage.consumer.drift_monitor import DriftMonitor
from triage.consumer.drift_report import read_reports
from triage.consumer.reader import TopicReader
from triage.consumer.supervisor import Supervisor
from triage.model import artifact
from triage.model.datagen import generate
from triage.model.streams import reference_topic_partitions
from triage.producer.replay import replay
from triage.settings import Settings

PHASE = 2_000


@dataclass
class Run:
    settings: Settings
    reports: list[dict]
    logs: list[dict]
    metrics: str
    probes: dict[str, int]  # /healthz and /readyz -> HTTP status, after the windows


def _write_orders(source: Path, rows: np.ndarray, out: Path) -> Path:
    lines = source.read_text().splitlines()
    out.write_text("\n".join([lines[0], *(lines[1 + i] for i in rows)]) + "\n")
    return out


def _score(settings: Settings, model_dir: Path, reference_dir: Path, orders_csv: Path,
           monitor: DriftMonitor) -> list[dict]:
    """Replay through a one-worker scorer on ``reference_dir``; the monitor reports a window."""
    supervisor = Supervisor(settings, model_dir, reference_dir, workers=1)
    supervisor.start()
    try:
        supervisor.wait_until_assigned(settings.topics.orders_partitions)
        sent = replay(settings, orders_csv, progress=False)
        assert sent.sent == PHASE and sent.failed == 0
        return monitor.run(max_windows=1, timeout_s=120)
    finally:
        assert set(supervisor.stop().values()) == {0}


@pytest.fixture(scope="module")
def run(fresh_settings: SettingsFactory, history: Path, model_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("drift-e2e")
    settings = fresh_settings(tmp).replace(
        sample_rate=1.0, drift_window_samples=PHASE, drift_min_samples=500,
        drift_metrics_port=free_port())
    shifted = tmp / "rollback"
    generate(20_000, 11, shifted, shift="zip-rollback")  # history is generate(20_000, 11)
    assert (shifted / "orders.csv").read_bytes() == (history / "orders.csv").read_bytes()
    rows = np.random.default_rng(3).permutation(20_000)
    unshifted_csv = _write_orders(history / "orders.csv", rows[:PHASE], tmp / "a.csv")
    shifted_csv = _write_orders(shifted / "orders.csv", rows[PHASE:2 * PHASE], tmp / "b.csv")

    with capture_logs() as logs, \
            DriftMonitor(settings.connection, settings.topics, settings.drift,
                         artifact.verify(model_dir), metrics_addr="127.0.0.1") as monitor:
        reports = _score(settings, model_dir, history, unshifted_csv, monitor)
        reports += _score(settings, model_dir, shifted, shifted_csv, monitor)
        url = f"http://127.0.0.1:{settings.drift.drift_metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            metrics = response.read().decode()
        probes = {}
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(url.replace("/metrics", path), timeout=10) as response:
                probes[path] = response.status
    return Run(settings, reports, logs, metrics, probes)


def test_unshifted_orders_report_no_drift(run: Run) -> None:
    first = run.reports[0]
    assert first["samples"] == PHASE and first["skipped"] == 0
    assert first["status"] == "ok", [(c["name"], c["adjusted_p_value"]) for c in first["checks"]]


def test_a_zip_rollback_reports_drift_on_zip_availability_only(run: Run) -> None:
    second = run.reports[1]
    assert second["samples"] == PHASE and second["status"] == "drift"
    drifted = {c["feature"] for c in second["checks"] if c["verdict"] == "drift"}
    # The prediction follows the feature (HoldCheckDelivery); nothing else may move.
    assert "zip_code_available" in drifted and drifted <= {"zip_code_available",
                                                           "recommendation"}
    zip_check = next(c for c in second["checks"] if c["name"] == "zip_code_available")
    shares = {b["label"]: (b["baseline"], b["current"]) for b in zip_check["bins"]}
    assert shares["available"][1] < shares["available"][0] - 0.05


def test_drift_detected_is_logged_with_feature_statistic_and_threshold(run: Run) -> None:
    events = [e for e in run.logs if e["event"] == "drift_detected"]
    assert {e["window_id"] for e in events} == {run.reports[1]["window_id"]}
    zip_event = next(e for e in events if e["feature"] == "zip_code_available")
    assert zip_event["statistic"] > zip_event["threshold"] > 0
    assert zip_event["adjusted_p_value"] <= zip_event["alpha"]


def test_metrics_show_the_latest_window(run: Run) -> None:
    def value(name: str, check: str) -> float:
        line = next(line for line in run.metrics.splitlines()
                    if line.startswith(name + "{") and f'check="{check}"' in line)
        return float(line.rsplit(" ", 1)[1])

    assert value("triage_drift_alarm", "zip_code_available") == 1.0
    assert value("triage_drift_alarm", "payment_status") == 0.0
    assert value("triage_drift_statistic", "zip_code_available") > value(
        "triage_drift_threshold", "zip_code_available")
    assert f"triage_drift_window_samples {float(PHASE)}" in run.metrics
    assert run.probes == {"/healthz": 200, "/readyz": 200}  # beside /metrics
    assert 'triage_drift_windows_total{status="drift"} 1.0' in run.metrics


def test_the_reports_topic_holds_both_windows(run: Run) -> None:
    stored = read_reports(run.settings.connection, run.settings.topics.drift_reports_topic,
                          idle_s=1.0)
    assert [r["window_id"] for r in stored] == [r["window_id"] for r in run.reports]


def _cli(settings: Settings, *args: str, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update({**settings.to_env(), "TRIAGE_LOG_FORMAT": "json"})
    return subprocess.Popen([sys.executable, "-m", "triage.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_drift_report_command_writes_the_page(run: Run, tmp_path: Path) -> None:
    """The command runs with the default sample rate (5%); the page and its note state the
    rate the worker sampled at (100%), carried by the samples and the reports."""
    out = tmp_path / "report.html"
    process = _cli(run.settings.replace(sample_rate=0.05), "drift", "report", "--out", str(out),
                   "--idle", "1")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "2 window(s), latest: drift" in stdout
    assert "The workers sampled 100% of orders" in stdout and "5%" not in stdout
    html = out.read_text()
    assert html.count("class='plot distribution'") == html.count("class='plot trend'") == 6
    assert "sampled at 100%" in html


def test_drift_monitor_command_reports_and_stops_cleanly_on_sigterm(
        run: Run, model_dir: Path) -> None:
    """A fresh group reads the 4,000 samples from the start: two windows of 2,000 (which mix
    the phases, since partitions are read side by side), written to a topic of its own."""
    settings = run.settings.replace(
        drift_reports_topic=run.settings.topics.drift_reports_topic + "-cli",
        drift_group_id=run.settings.drift.drift_group_id + "-cli", drift_metrics_port=0)
    # The monitor expects its reports topic, as `triage topics create` makes it.
    create_topics(settings.connection, settings.topics, reference_topic_partitions(settings.topics))
    monitor = _cli(settings, "drift", "monitor", "--model", str(model_dir))
    try:
        found: list[dict] = []
        deadline = time.monotonic() + 120
        with TopicReader(settings.connection, settings.topics.drift_reports_topic,
                         "drift_report") as reader:
            while len(found) < 2 and monitor.poll() is None and time.monotonic() < deadline:
                found += [record for _, record in reader.poll(timeout_s=1.0)]
        assert len(found) == 2 and sum(r["samples"] for r in found) == 2 * PHASE
    finally:
        monitor.send_signal(signal.SIGTERM)
        _, stderr = monitor.communicate(timeout=30)
    assert monitor.returncode == 0, stderr
    windows = [json.loads(line) for line in stderr.splitlines()
               if line.startswith("{") and '"drift_window"' in line]
    assert len(windows) == 2


def test_a_time_window_without_samples_reports_insufficient_data(settings: Settings,
                                                                  model_dir: Path) -> None:
    """Windows by time only: with nothing sampled, the window still closes and says so (a
    stalled sampler is visible)."""
    settings = settings.replace(drift_window_samples=0, drift_window_minutes=0.01)
    with DriftMonitor(settings.connection, settings.topics, settings.drift,
                      artifact.verify(model_dir)) as monitor:
        (report,) = monitor.run(max_windows=1, timeout_s=60)
    assert report["status"] == "insufficient_data" and report["samples"] == 0
    assert {c["verdict"] for c in report["checks"]} == {"insufficient_data"}
    assert read_reports(settings.connection, settings.topics.drift_reports_topic,
                        idle_s=1.0)[0]["window_id"] == report["window_id"]


def test_drift_settings_are_checked() -> None:
    from triage.bus.settings import SettingsError

    with pytest.raises(SettingsError, match="TRIAGE_DRIFT_WINDOW_SAMPLES"):
        Settings.of(drift_window_samples=0, drift_window_minutes=0)
    with pytest.raises(SettingsError, match="drift_alpha"):
        Settings.from_env({"TRIAGE_DRIFT_ALPHA": "1.5"})
    drift = Settings.from_env({"TRIAGE_DRIFT_WINDOW_MINUTES": "2.5"}).drift
    assert drift.drift_window_minutes == 2.5
