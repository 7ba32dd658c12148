"""Shared fixtures. Every integration test gets its broker from ``bootstrap``:
TRIAGE_BOOTSTRAP_SERVERS if set, else Kafka in testcontainers when Docker runs, else the
embedded broker. Each test then isolates itself with topics and a group of its own."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from triage.bus.clients import create_topics
from triage.bus.embedded import EmbeddedBroker
from triage.bus.settings import Settings
from triage.model.datagen import generate
from triage.model.train import train


def _docker_running() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("TRIAGE_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
    elif _docker_running():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
    else:
        log = tmp_path_factory.mktemp("broker") / "tansu.log"
        with EmbeddedBroker(log_path=log) as broker:
            yield broker.bootstrap


@pytest.fixture
def settings(bootstrap: str, tmp_path: Path) -> Settings:
    """Settings with topics and a consumer group no other test uses; the topics exist."""
    run = uuid.uuid4().hex[:8]
    settings = Settings.of(
        bootstrap_servers=bootstrap,
        orders_topic=f"orders-{run}", predictions_topic=f"predictions-{run}",
        drift_topic=f"drift-{run}", dlq_topic=f"orders.dlq-{run}",
        drift_reports_topic=f"drift.reports-{run}", drift_group_id=f"triage-drift-{run}",
        inventory_topic=f"inventory-{run}", payments_topic=f"payments-{run}",
        zip_codes_topic=f"zip_codes-{run}", reference_dlq_topic=f"reference.dlq-{run}",
        models_topic=f"models.control-{run}", shadow_topic=f"predictions.shadow-{run}",
        group_id=f"triage-scorer-{run}", state_dir=str(tmp_path / "state"),
    )
    create_topics(settings.connection, settings.topics)
    return settings


@pytest.fixture(scope="session")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20k generated orders with their reference data."""
    path = tmp_path_factory.mktemp("history")
    generate(20_000, 11, path)
    return path


@pytest.fixture(scope="session")
def model_dir(history: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model")
    train(history, path)
    return path


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_SESSION_STARTED: list[float] = []


def pytest_configure(config: pytest.Config) -> None:
    """Give this test run a state directory of its own, before any test or child process
    starts: the embedded broker's state file (``triage broker``) is per user by default, and a
    test must never find a broker that another run, or a person, started."""
    import tempfile

    state = tempfile.mkdtemp(prefix="triage-test-state-")
    os.environ["TRIAGE_STATE_DIR"] = state
    os.environ["XDG_STATE_HOME"] = state


def pytest_sessionstart(session: pytest.Session) -> None:
    import time

    _SESSION_STARTED.append(time.time())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the delivery figures tests/test_delivery.py measured in this run."""
    import json

    folder = Path(__file__).parent.parent / "results" / "delivery"
    started = _SESSION_STARTED[0] if _SESSION_STARTED else 0.0
    files = [f for f in sorted(folder.glob("*.json")) if f.stat().st_mtime >= started]
    if not files:
        return
    terminalreporter.section("delivery figures (results/delivery)")
    for path in files:
        figures = json.loads(path.read_text())
        terminalreporter.write_line(f"{path.stem}: " + ", ".join(
            f"{k} {v}" for k, v in figures.items()))
