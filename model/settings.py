"""The model side's settings (model/): the input files' encoding and the optional MLflow
mirror of the registry. The machinery, and the flat ``TRIAGE_*`` variables, are
bus/settings.py's."""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from triage.bus.settings import SettingsError, setting


@dataclass(frozen=True)
class DataSettings:
    """The input CSVs (orders, the reference streams' snapshots)."""

    csv_encoding: str = setting(
        "utf-8", "TRIAGE_CSV_ENCODING",
        "Text encoding of the input CSVs (`--encoding`), e.g. `cp1252` for files saved by "
        "Excel on Windows. UTF-8 files may start with a byte-order mark.")

    def __post_init__(self) -> None:
        try:
            codecs.lookup(self.csv_encoding)
        except LookupError:
            raise SettingsError(f"TRIAGE_CSV_ENCODING={self.csv_encoding!r} is not a text "
                                "encoding Python knows (e.g. utf-8, cp1252, latin-1)") from None


@dataclass(frozen=True)
class MlflowSettings:
    """MLflow, where `triage train` also logs and registers (model/mlflow_registry.py)."""

    mlflow_tracking_uri: str = setting(
        "", "TRIAGE_MLFLOW_TRACKING_URI",
        "MLflow tracking server or store (`http://mlflow:5000`, `sqlite:///mlflow.db`). Set, "
        "and with `mlflow-skinny` installed, `triage train` also logs its run and registers "
        "the model there, and `triage models promote` accepts `models:/NAME/VERSION`.")
    mlflow_model_name: str = setting(
        "triage", "TRIAGE_MLFLOW_MODEL_NAME",
        "Registered model name that `triage train` adds its versions to in MLflow.")
    mlflow_experiment: str = setting(
        "triage", "TRIAGE_MLFLOW_EXPERIMENT", "MLflow experiment that `triage train` logs to.")
