"""Training: label the history with the policy, fit XGBoost, gate on holdout accuracy, save.

Stock enters the model only as the design column ``in_stock`` (inventory > 0; see
``model.artifact``), never as the raw level: the history holds whole levels only, and a tree
fitted on them puts its splits at 1.0 or above, so a level such as 0.5 (goods sold by weight)
would get a confident wrong answer.

Coverage rows: the fit also sees :func:`coverage_rows`, every combination of the values each
feature declares as its coverage (model.features.FEATURES: stock states missing, <= 0 and > 0,
every hour, zip served or not) and of every categorical feature's vocabulary (payment statuses,
``MISSING`` and ``__UNSEEN__`` included), labelled by the same policy function. The history need not
hold every combination for the model to learn it. These rows are for fitting only: the holdout
metrics and the drift baseline are computed on the history alone, and the manifest records how
many were added (``metrics.synthetic_rows``).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import xgboost
from sklearn.metrics import accuracy_score, confusion_matrix
from sklearn.model_selection import train_test_split
from xgboost import XGBClassifier

from triage.bus.errors import ConfigurationError
from triage.model import artifact
from triage.model.artifact import UNSEEN_STATUS, DesignColumns, feature_order
from triage.model.drift import training_baseline
from triage.model.features import FEATURE_NAMES, FEATURES, WINDOWED_NAMES, FeatureBatch
from triage.model.orders import read_orders_csv
from triage.model.policy import CLASSES, POLICIES, POLICY_FEATURES
from triage.model.reference import MISSING_STATUS, ReferenceTables, zip_code_warnings
from triage.model.tables import confusion_text

MIN_ACCURACY = 0.995
UNSEEN_SHARE = 0.1  # share of non-OK statuses relabelled __UNSEEN__ to teach that category
PARAMS = {"n_estimators": 60, "max_depth": 5, "learning_rate": 0.3, "tree_method": "hist"}


class TrainingError(ConfigurationError):
    """The data cannot train a model, or the model misses the accuracy gate."""


@dataclass(frozen=True)
class TrainReport:
    model_dir: Path | None
    version: str | None
    holdout_accuracy: float
    confusion: list[list[int]]
    classes: tuple[str, ...]
    rows: int
    synthetic_rows: int
    warnings: tuple[str, ...] = ()  # about the data: rows skipped, zips that look truncated
    windowed: tuple[str, ...] = ()  # the windowed features the model reads (its policy's too)

    def confusion_table(self) -> str:
        """The holdout's confusion matrix as text (rows: the policy's labels, columns: the
        model's), every class name whole (model/tables.py)."""
        return confusion_text("policy \\ model", self.classes, self.confusion)


def _with_unseen(features: FeatureBatch, rng: np.random.Generator) -> FeatureBatch:
    """The training features with a share of the non-OK payment statuses relabelled
    ``__UNSEEN__`` (their labels unchanged), which teaches the model that the policy treats a
    status it never saw as not OK."""
    statuses = features.payment_status.copy()
    not_ok = np.flatnonzero(statuses != "OK")
    chosen = rng.choice(not_ok, size=int(len(not_ok) * UNSEEN_SHARE), replace=False)
    statuses[chosen] = UNSEEN_STATUS
    return FeatureBatch(**{**features.columns, "payment_status": statuses})


def coverage_rows(vocabularies: dict[str, list[str]], windowed: Sequence[str] = ()
                  ) -> FeatureBatch:
    """Every combination of the declared coverage values of each feature (a categorical
    feature: its vocabulary; a windowed feature not in ``windowed``, the model does not read
    it: null), once each: the product of their counts, in rows."""
    axes: list[np.ndarray] = [
        np.array(vocabularies[f.name] if f.categorical else
                 f.coverage if f.window is None or f.name in windowed else (np.nan,),
                 dtype=f.dtype)
        for f in FEATURES]
    grid = np.meshgrid(*(np.arange(len(axis)) for axis in axes), indexing="ij")
    return FeatureBatch(**{f.name: axis[index.ravel()]
                           for f, axis, index in zip(FEATURES, axes, grid, strict=True)})


def vocabularies(features: FeatureBatch, reference: ReferenceTables) -> dict[str, list[str]]:
    """Per categorical feature, the values the model is trained to know, then the reserved
    ``__UNSEEN__``: the values the history has and, for payment status, every status of
    payments.csv (``MISSING`` first)."""
    found: dict[str, list[str]] = {}
    for feature in FEATURES:
        if feature.categorical:
            values = set(features.columns[feature.name].tolist())
            if feature.name == "payment_status":
                values |= set(reference.vocabularies["payments"].names)
            first = [MISSING_STATUS] if MISSING_STATUS in values else []
            found[feature.name] = [*first, *sorted(values - {MISSING_STATUS}), UNSEEN_STATUS]
    return found


def train(data_dir: str | Path, out_dir: str | Path, *, seed: int = 0, holdout: float = 0.2,
          min_accuracy: float = MIN_ACCURACY, encoding: str = "utf-8",
          windowed: Sequence[str] = (), policy: str = "v1") -> TrainReport:
    """Train on ``data_dir``'s CSVs and write the artifact to ``out_dir`` if the gate passes.
    ``windowed``: windowed features (model/windows.py) the model reads besides the four,
    computed offline, point in time, over orders.csv (``offline_values``); a model that reads
    them is scored with the feature stage's values (``triage windows``). ``policy``: the
    policy that labels the history (model/policy.py ``POLICIES``); the windowed features it
    decides on are trained on whether named in ``windowed`` or not.

    Raises TrainingError (no artifact written) when a class has no example, the holdout
    accuracy is below ``min_accuracy``, ``windowed`` names an undeclared feature or
    ``policy`` an unknown policy;
    ReferenceDataError when a CSV cannot be read."""
    data_dir = Path(data_dir)
    orders = read_orders_csv(data_dir / "orders.csv", encoding=encoding)
    reference = ReferenceTables.load(data_dir, encoding=encoding)
    warnings = (*(f"orders.csv {row}; not trained on" for row in orders.skipped),
                *zip_code_warnings(reference.keys("zip_codes"), orders.zip_code))
    if policy not in POLICIES:
        raise TrainingError(f"unknown policy {policy!r}; the policies are "
                            f"{', '.join(POLICIES)} (model/policy.py)")
    windowed = [*windowed, *POLICY_FEATURES[policy]]
    unknown = sorted(set(windowed) - set(WINDOWED_NAMES))
    if unknown:
        raise TrainingError(f"{', '.join(unknown)}: no such windowed feature; declared: "
                            f"{', '.join(WINDOWED_NAMES)} (model/windows.py)")
    windowed = [name for name in WINDOWED_NAMES if name in windowed]
    features = orders.features(reference, windowed)
    label = POLICIES[policy]
    labels = label(features)
    present = set(labels.tolist())
    if len(present) < len(CLASSES):
        raise TrainingError(f"the history has no order labelled {sorted(set(CLASSES) - present)}; "
                            "every recommendation needs examples")

    rng = np.random.default_rng(seed)
    categories = vocabularies(features, reference)
    class_order = sorted(CLASSES)  # XGBoost's class indices follow the sorted names
    manifest: dict[str, Any] = {
        "categories": categories,
        "classes": class_order,
        "features": [name for name in FEATURE_NAMES
                     if name not in WINDOWED_NAMES or name in windowed],
        "feature_order": feature_order(categories, windowed),
        "policy": policy,
    }
    columns = DesignColumns(manifest["feature_order"])
    matrix = columns.build(_with_unseen(features, rng))
    targets = np.searchsorted(np.array(class_order), labels.astype(str))
    coverage = coverage_rows(categories, windowed)
    coverage_matrix = columns.build(coverage)
    coverage_targets = np.searchsorted(np.array(class_order), label(coverage).astype(str))

    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=holdout,
                                           random_state=seed, stratify=targets)
    classifier = XGBClassifier(**PARAMS, random_state=seed, n_jobs=2)
    classifier.fit(np.concatenate([matrix[train_idx], coverage_matrix]),
                   np.concatenate([targets[train_idx], coverage_targets]))
    predicted = classifier.predict(matrix[test_idx])
    accuracy = float(accuracy_score(targets[test_idx], predicted))
    confusion = confusion_matrix(targets[test_idx], predicted,
                                 labels=range(len(class_order))).tolist()
    report = TrainReport(None, None, accuracy, confusion, tuple(class_order), len(labels),
                         len(coverage), warnings, tuple(windowed))
    if accuracy < min_accuracy:
        raise TrainingError(f"holdout accuracy {accuracy:.4%} is below the gate "
                            f"{min_accuracy:.2%}; no artifact written\n{report.confusion_table()}")

    manifest.update({
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "metrics": {"holdout_accuracy": accuracy, "confusion_matrix": confusion,
                    "train_rows": len(train_idx), "holdout_rows": len(test_idx),
                    "synthetic_rows": len(coverage)},
        # The model's own predictions on every order of the history (coverage rows excluded):
        # live predictions are compared with these, not with the policy's labels.
        "baseline": training_baseline(features, np.array(class_order, dtype=object)[
            classifier.predict(columns.build(features))], windowed),
        "training": {"data_dir": str(data_dir.resolve()), "seed": seed, "params": PARAMS,
                     "data_sha256": {name: artifact.sha256_of(data_dir / name) for name in
                                     ("orders.csv", "payments.csv", "inventory.csv",
                                      "zip_codes.csv")}},
        "libraries": {"xgboost": xgboost.__version__, "scikit-learn": sklearn.__version__,
                      "python": platform.python_version()},
    })
    artifact.save(classifier, manifest, out_dir)
    version = artifact.read_manifest(out_dir)["version"]
    return TrainReport(Path(out_dir), version, accuracy, confusion, tuple(class_order),
                       len(labels), len(coverage), warnings, tuple(windowed))
