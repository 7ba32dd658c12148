"""MLflow beside the triage registry (model/mlflow_registry.py), against a local ``sqlite:///``
tracking store: `triage train` logs and registers, `triage models promote models:/NAME/N`
fetches, verifies and promotes; and the project without mlflow installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TRIAGE, cli, tamper
from triage.consumer.supervisor import worker_env
from triage.model import artifact
from triage.model.registry import Registry
from triage.scoring.follower import read_state
from triage.settings import Settings


def run(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRIAGE, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=180)


def test_train_registers_in_mlflow_and_promote_takes_a_models_reference(
        settings: Settings, history: Path, tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow", reason="the optional MLflow support needs mlflow "
                                 "(requirements-dev.txt installs mlflow-skinny)")
    uri = f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    (tmp_path / "tracking").mkdir()
    settings = settings.replace(mlflow_tracking_uri=uri, mlflow_model_name="orders-triage")
    env = worker_env(settings)
    trained = run("train", "--data", str(history), "--out", str(tmp_path / "model"), env=env,
                  cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "registered models:/orders-triage/1 in MLflow" in trained.stdout
    manifest = artifact.read_manifest(tmp_path / "model")
    assert not (tmp_path / "mlruns").exists()  # artifacts beside the store, not in the cwd

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    registered = client.get_model_version("orders-triage", "1")
    assert registered.tags["triage.version"] == manifest["version"]
    logged = client.get_run(registered.run_id).data
    assert logged.metrics["holdout_accuracy"] == manifest["metrics"]["holdout_accuracy"]
    assert logged.tags["data_sha256.orders.csv"] == artifact.sha256_of(history / "orders.csv")

    registry = tmp_path / "registry"  # empty: the version comes from MLflow
    promoted = cli(settings, "promote", "models:/orders-triage/1", "--registry",
                   str(registry), "--by", "test")
    assert promoted.returncode == 0, promoted.stderr
    state = read_state(settings.connection, settings.topics)
    assert state is not None and state.active == manifest["version"]
    assert Registry(registry).get(manifest["version"]).holdout_accuracy == \
        manifest["metrics"]["holdout_accuracy"]

    unknown = cli(settings, "promote", "models:/orders-triage/9", "--registry", str(registry))
    assert unknown.returncode == 2, unknown.stderr
    assert "models:/orders-triage/9" in unknown.stderr and "Traceback" not in unknown.stderr

    # A changed file in MLflow's copy is refused when it is fetched, before any promotion.
    second = run("train", "--data", str(history), "--registry", str(tmp_path / "other"),
                 "--seed", "3", env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    version_2 = client.get_model_version("orders-triage", "2").tags["triage.version"]
    tamper(Path(client.get_model_version("orders-triage", "2").source
                .removeprefix("file://")))
    refused = cli(settings, "promote", "models:/orders-triage/2", "--registry", str(registry))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert read_state(settings.connection, settings.topics).active == manifest["version"]
    assert version_2 not in {v.version for v in Registry(registry).versions()}


def test_without_mlflow_train_says_what_to_install_before_training(
        history: Path, tmp_path: Path) -> None:
    """mlflow made unimportable in the child (as on an install without it): with the URI set,
    `train` stops at once with exit status 2 and writes nothing; without it, nothing imports
    mlflow."""
    blocked = ("import sys; sys.modules['mlflow'] = None; from triage.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "model"
    env = {**os.environ, "TRIAGE_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    stopped = subprocess.run([sys.executable, "-c", blocked, "train", "--data", str(history),
                              "--out", str(out)], env=env, capture_output=True, text=True,
                             timeout=120)
    assert stopped.returncode == 2, stopped.stderr
    assert "mlflow is not installed: pip install mlflow-skinny" in stopped.stderr
    assert not out.exists()

    env.pop("TRIAGE_MLFLOW_TRACKING_URI")
    unused = subprocess.run([sys.executable, "-c", blocked, "models", "promote",
                             "models:/triage/1", "--registry", str(tmp_path / "r")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert unused.returncode == 2, unused.stderr
    assert "TRIAGE_MLFLOW_TRACKING_URI is not set" in unused.stderr
