"""The model artifact: XGBoost's native JSON model plus ``manifest.json``. Nothing is pickled.

The manifest holds the version, the feature order, the category vocabularies, the classes, the
training metrics, the drift baseline and the sha256 of every other file. :func:`load` checks
every hash before it parses anything, and refuses the artifact if one differs.

Unknown categories: a ``payment_status`` the model never saw (say ``CHARGEBACK``) is encoded
as the reserved category ``__UNSEEN__``. Training teaches the model that category by relabelling
a share of non-OK statuses as ``__UNSEEN__`` (their labels stay as the policy gave them), so an
unseen status is scored like any other non-OK status, which is what the policy says.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from xgboost import XGBClassifier

from model.features import FeatureBatch

MANIFEST = "manifest.json"
MODEL_FILE = "model.json"
FORMAT = "triage-model/1"
UNSEEN_STATUS = "__UNSEEN__"
NUMERIC_COLUMNS = ("order_hour_of_day", "inventory", "zip_code_available")


class ArtifactError(RuntimeError):
    """The model directory is missing a file, or a file is not what the manifest says."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def feature_order(payment_vocabulary: list[str]) -> list[str]:
    return [*NUMERIC_COLUMNS, *(f"payment_status={s}" for s in payment_vocabulary)]


@dataclass
class Model:
    classifier: XGBClassifier
    manifest: dict[str, Any]

    def __post_init__(self) -> None:
        vocabulary = self.manifest["categories"]["payment_status"]
        self._status_index = {s: i for i, s in enumerate(vocabulary)}
        self._unseen = self._status_index[UNSEEN_STATUS]
        self.classes = np.array(self.manifest["classes"], dtype=object)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def design_matrix(self, features: FeatureBatch) -> np.ndarray:
        """Numeric columns, then one column per known payment status (one-hot)."""
        n = len(features)
        index, unseen = self._status_index, self._unseen
        codes = np.fromiter((index.get(s, unseen) for s in features.payment_status),
                            dtype=np.int64, count=n)
        matrix = np.zeros((n, len(NUMERIC_COLUMNS) + len(index)), dtype=np.float32)
        matrix[:, 0] = features.order_hour_of_day
        matrix[:, 1] = features.inventory
        matrix[:, 2] = features.zip_code_available
        matrix[np.arange(n), len(NUMERIC_COLUMNS) + codes] = 1.0
        return matrix

    def predict_proba(self, features: FeatureBatch) -> np.ndarray:
        """float32 probabilities, one column per entry of ``classes``."""
        if len(features) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return self.classifier.predict_proba(self.design_matrix(features)).astype(np.float32)

    def predict(self, features: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
        """(recommendation per order, probabilities)."""
        proba = self.predict_proba(features)
        return self.classes[proba.argmax(axis=1)], proba


def save(classifier: XGBClassifier, manifest: dict[str, Any], out_dir: str | Path) -> Path:
    """Write the model and its manifest; the version is derived from the model's own hash."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    classifier.save_model(model_path)
    digest = sha256_of(model_path)
    manifest = {
        "format": FORMAT,
        "version": f"xgb-{digest[:12]}",
        **manifest,
        "model_file": MODEL_FILE,
        "files": {MODEL_FILE: digest},
    }
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(out_dir / MANIFEST)
    return out_dir / MANIFEST


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} not found: is {model_dir} a model directory "
                            "written by `triage train`?") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def verify(model_dir: str | Path) -> dict[str, Any]:
    """The manifest, once every file it lists has the sha256 it records."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    for name, expected in manifest["files"].items():
        path = model_dir / name
        if Path(name).name != name:
            raise ArtifactError(f"manifest lists {name!r}, which is outside the model directory")
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing")
        actual = sha256_of(path)
        if actual != expected:
            raise ArtifactError(
                f"{path} has sha256 {actual}, but the manifest records {expected}: the file "
                "was changed after training. Refusing to load it; retrain or restore it.")
    return manifest


def load(model_dir: str | Path, n_threads: int = 1) -> Model:
    manifest = verify(model_dir)
    classifier = XGBClassifier(n_jobs=n_threads)
    classifier.load_model(Path(model_dir) / manifest["model_file"])
    return Model(classifier, manifest)
