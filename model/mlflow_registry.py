"""MLflow's model registry beside ours (optional): for teams that keep their models in MLflow.

With ``mlflow-skinny`` installed and ``TRIAGE_MLFLOW_TRACKING_URI`` set:

- :func:`log_training` (``triage train``) logs the run to the experiment
  ``TRIAGE_MLFLOW_EXPERIMENT``: the training parameters, the holdout metrics, the artifact's
  version id and training-data hashes as tags, and the whole verified artifact directory as the
  run's ``model`` artifact; then registers it as a new version of the registered model
  ``TRIAGE_MLFLOW_MODEL_NAME`` (tag ``triage.version`` = our version id).
- :func:`fetch` (``triage models promote models:/NAME/VERSION``, or ``models:/NAME@alias``)
  downloads that artifact; the caller adds it to the triage registry (where it is verified, file
  by file, against its manifest) and promotes it there.

Workers never talk to MLflow: they follow the triage registry and the control topic
(scoring/follower.py), so a tracking server that is down stops neither scoring nor a rollback.
The artifact is stored as it is, not as an MLflow "flavor": MLflow keeps it, triage verifies
and loads it.

Without ``TRIAGE_MLFLOW_TRACKING_URI`` nothing here imports mlflow. With it set and mlflow
missing, the commands stop with a configuration error naming the package to install.
For a local ``sqlite:///PATH`` store, a new experiment keeps its artifacts in ``mlruns`` beside
the database file (not in the working directory, MLflow's default).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from triage.bus.errors import InfrastructureError
from triage.bus.settings import SettingsError
from triage.model import artifact
from triage.model.registry import RegistryError
from triage.model.settings import MlflowSettings

MODELS_SCHEME = "models:/"
VERSION_TAG = "triage.version"
ARTIFACT_PATH = "model"


def _mlflow(settings: MlflowSettings) -> Any:
    """The mlflow module, pointed at the tracking URI. Raises SettingsError if the URI is unset
    or mlflow is not installed."""
    if not settings.mlflow_tracking_uri:
        raise SettingsError("TRIAGE_MLFLOW_TRACKING_URI is not set: it names the MLflow "
                            "tracking server or store (for example sqlite:///mlflow.db)")
    try:
        import mlflow
    except ImportError:
        raise SettingsError("TRIAGE_MLFLOW_TRACKING_URI is set but mlflow is not installed: "
                            "pip install mlflow-skinny (and sqlalchemy alembic for a sqlite "
                            "or SQL store)") from None
    for name in ("mlflow", "alembic"):  # table creation, migrations: not the user's business
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    return mlflow


def check_installed(settings: MlflowSettings) -> None:
    """Raises SettingsError unless the tracking URI is set and mlflow can be imported: called
    before work whose result would otherwise be lost at the end."""
    _mlflow(settings)


@contextmanager
def _errors(what: str) -> Iterator[None]:
    """MLflow's exceptions as ours: a name or version that does not exist is the user's to fix
    (RegistryError), anything else (server down, store unreadable) is infrastructure."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE",
                            "NOT_FOUND", "BAD_REQUEST"):
            raise RegistryError(f"{what}: {e.message}") from None
        raise InfrastructureError(f"{what}: {e.message}") from None


def _experiment_id(mlflow: Any, settings: MlflowSettings) -> str:
    """The experiment's id, created if missing; a new one on a local sqlite store keeps its
    artifacts beside the database file."""
    found = mlflow.get_experiment_by_name(settings.mlflow_experiment)
    if found is not None:
        return str(found.experiment_id)
    location = None
    uri = settings.mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    return str(mlflow.create_experiment(settings.mlflow_experiment, artifact_location=location))


def log_training(settings: MlflowSettings, model_dir: str | Path) -> str:
    """Log the training run of the verified artifact in ``model_dir`` and register it; returns
    the new model version's reference, ``models:/NAME/N``. Raises SettingsError (no URI, no
    mlflow), ArtifactError (the artifact does not verify), InfrastructureError (the tracking
    server failed)."""
    mlflow = _mlflow(settings)
    manifest = artifact.verify(model_dir)
    metrics, training = manifest.get("metrics", {}), manifest.get("training", {})
    with _errors(f"MLflow at {settings.mlflow_tracking_uri}"):
        experiment = _experiment_id(mlflow, settings)
        with mlflow.start_run(experiment_id=experiment,
                              run_name=f"triage-train-{manifest['version']}") as run:
            mlflow.log_params({"seed": training.get("seed"), "data_dir": training.get("data_dir"),
                               **{f"xgb.{k}": v for k, v in training.get("params", {}).items()}})
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                                if isinstance(v, int | float)})
            mlflow.set_tags({VERSION_TAG: manifest["version"],
                             **{f"data_sha256.{name}": digest for name, digest in
                                training.get("data_sha256", {}).items()}})
            mlflow.log_artifacts(str(model_dir), artifact_path=ARTIFACT_PATH)
        client = mlflow.MlflowClient()
        name = settings.mlflow_model_name
        if not _registered(client, name):
            client.create_registered_model(
                name, description="triage order scorer (verified artifacts; load with triage)")
        version = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}", run_id=run.info.run_id,
            tags={VERSION_TAG: manifest["version"]})
    return f"{MODELS_SCHEME}{name}/{version.version}"


def _registered(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


@contextmanager
def fetch(settings: MlflowSettings, reference: str) -> Iterator[Path]:
    """Download the artifact of ``models:/NAME/VERSION`` (or ``models:/NAME@alias``) into a
    temporary directory, yielded while the context is open. Raises SettingsError (not a
    models:/ reference, no URI, no mlflow), RegistryError (no such model or version),
    InfrastructureError (the tracking server failed)."""
    if not reference.startswith(MODELS_SCHEME):
        raise SettingsError(f"{reference!r} is not an MLflow model reference (models:/NAME/N)")
    mlflow = _mlflow(settings)
    with tempfile.TemporaryDirectory(prefix="triage-mlflow-") as scratch, \
            _errors(f"{reference} in MLflow at {settings.mlflow_tracking_uri}"):
        yield Path(mlflow.artifacts.download_artifacts(artifact_uri=reference,
                                                       dst_path=scratch))
