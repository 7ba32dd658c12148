"""What both tiers share: generated history and a model trained on it, ``env``, a state
directory of the run's own, and the run's summary (which broker the integration tests ran on,
the delivery figures). The broker fixtures are in tests/integration/conftest.py: a unit test
(tests/unit/) cannot ask for a broker."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import DELIVERY_RESULTS, EXERCISE, broker_notes
from triage.model import train as train_module
from triage.model.datagen import generate
from triage.model.policy import label
from triage.model.registry import Registry
from triage.model.train import train


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
    # One id per run, the same in its pytest-xdist workers (started after this, they inherit
    # it): the brokers they note are this run's alone (helpers.broker_notes).
    os.environ.setdefault("TRIAGE_TEST_RUN", uuid.uuid4().hex[:12])


def pytest_sessionstart(session: pytest.Session) -> None:
    import time

    _SESSION_STARTED.append(time.time())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print which broker the integration tests ran on, where its log is when a test failed,
    and the delivery figures tests/test_delivery.py measured in this run."""
    import json

    if "PYTEST_XDIST_WORKER" in os.environ:  # the process that started the workers prints
        return
    started = _SESSION_STARTED[0] if _SESSION_STARTED else 0.0
    failed = terminalreporter.stats.get("failed")
    notes = broker_notes()
    for path in sorted(notes.glob("*.json")) if notes.is_dir() else ():
        noted = json.loads(path.read_text())
        terminalreporter.write_line(
            f"{path.stem}: integration tests on {noted['kind']} at {noted['bootstrap']}"
            + (f"; its log: {noted['log']}" if failed and noted["log"] else ""))
    shutil.rmtree(notes, ignore_errors=True)

    folder = DELIVERY_RESULTS
    files = [f for f in sorted(folder.glob("*.json")) if f.stat().st_mtime >= started]
    if not files:
        return
    terminalreporter.section("delivery figures (results/delivery)")
    for path in files:
        figures = json.loads(path.read_text())
        terminalreporter.write_line(f"{path.stem}: " + ", ".join(
            f"{k} {v}" for k, v in figures.items()))


@pytest.fixture(scope="module")
def exercise_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained on the exercise's orders (tests/data/exercise-2021)."""
    out = tmp_path_factory.mktemp("exercise-model")
    train(EXERCISE, out)
    return out


def swapped(labels: np.ndarray) -> np.ndarray:
    """The policy's labels with Deliver and HoldCheckPayment exchanged: a mislabelled history."""
    out = labels.copy()
    out[labels == "Deliver"], out[labels == "HoldCheckPayment"] = "HoldCheckPayment", "Deliver"
    return out


@pytest.fixture(scope="module")
def registry(model_dir: Path, history: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Registry, str, str, str]:
    """A registry with three versions: the session's model, one trained with another seed,
    and a bad candidate trained on mislabelled data (its recorded holdout accuracy is against
    those labels, so it passes the offline gate)."""
    root = tmp_path_factory.mktemp("registry") / "models"
    reg = Registry(root)
    v1 = reg.add(model_dir).version
    v2 = reg.add(train(history, tmp_path_factory.mktemp("v2") / "model", seed=11).model_dir
                  or "").version
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(train_module.POLICIES, "v1", lambda features: swapped(label(features)))
        bad = reg.add(train(history, tmp_path_factory.mktemp("bad") / "model", seed=5)
                      .model_dir or "").version
    assert len({v1, v2, bad}) == 3
    return reg, v1, v2, bad
