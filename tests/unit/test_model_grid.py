"""The trained model against the policy on a dense grid of inputs, off the training data too.

Training only sees whole stock levels, yet stock is a float (goods sold by weight): the model
must say what the policy says for any level, every hour, every payment status (known or not)
and both zip states. Also: the design columns come from the manifest, so artifacts written
before ``in_stock`` existed still load, and a manifest naming an unknown column is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from xgboost import XGBClassifier

from triage.model import artifact
from triage.model.artifact import UNSEEN_STATUS, ArtifactError
from triage.model.features import FeatureBatch
from triage.model.policy import label

UNSEEN_NAME = "CHARGEBACK"


def grid(vocabulary: list[str]) -> FeatureBatch:
    """stock × hour × payment status × zip, every combination once (row-major)."""
    stock = np.concatenate([np.round(np.arange(-1.0, 2.0005, 0.001), 3), [-1e6, 1e6, np.nan]])
    hours = np.arange(24)
    statuses = np.array([*(s for s in vocabulary if s != UNSEEN_STATUS), UNSEEN_NAME],
                        dtype=object)
    zips = np.array([True, False])
    s, h, p, z = (a.ravel() for a in np.meshgrid(np.arange(len(stock)), hours,
                                                 np.arange(len(statuses)), np.arange(2),
                                                 indexing="ij"))
    return FeatureBatch(order_hour_of_day=h.astype(np.int64), inventory=stock[s],
                        payment_status=statuses[p], zip_code_available=zips[z])


def test_the_model_agrees_with_the_policy_on_the_whole_grid(model_dir: Path) -> None:
    model = artifact.load(model_dir, n_threads=2)
    features = grid(model.manifest["categories"]["payment_status"])
    assert len(features) > 1_000_000
    predicted, _ = model.predict(features)
    expected = label(features)
    wrong = np.flatnonzero(predicted != expected)
    examples = [(float(features.inventory[i]), int(features.order_hour_of_day[i]),
                 str(features.payment_status[i]), bool(features.zip_code_available[i]),
                 f"model {predicted[i]}", f"policy {expected[i]}") for i in wrong[:5]]
    assert len(wrong) == 0, (f"{len(wrong)} of {len(features)} grid points disagree with the "
                             f"policy, e.g. (stock, hour, status, zip): {examples}")


def test_a_new_manifest_builds_in_stock_and_counts_its_coverage_rows(model_dir: Path) -> None:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    vocabulary = manifest["categories"]["payment_status"]
    assert manifest["features"] == ["order_hour_of_day", "inventory", "payment_status",
                                    "zip_code_available"]
    assert manifest["feature_order"] == ["order_hour_of_day", "in_stock", "zip_code_available",
                                         *(f"payment_status={s}" for s in vocabulary)]
    assert manifest["metrics"]["synthetic_rows"] == 7 * 24 * len(vocabulary) * 2
    # Coverage rows are for fitting only: the holdout and the drift baseline are the history's.
    assert manifest["metrics"]["holdout_rows"] + manifest["metrics"]["train_rows"] == 20_000
    assert manifest["baseline"]["rows"] == 20_000


OLD_LAYOUT = ["order_hour_of_day", "inventory", "zip_code_available", "payment_status=MISSING",
              "payment_status=OK", f"payment_status={UNSEEN_STATUS}"]
CLASSES = sorted(["Deliver", "HoldCheckAvailability", "HoldCheckDelivery", "HoldCheckPayment",
                  "Decline"])


def old_layout_rows() -> tuple[FeatureBatch, np.ndarray]:
    """Features, and the matrix the code before ``in_stock`` built from them, by hand."""
    rows = [(h, s, p, z) for h in (3, 12) for s in (np.nan, 0.0, 5.0, 40.0)
            for p in ("MISSING", "OK", "PENDING") for z in (True, False)]
    hours, stock, statuses, zips = (np.array(c) for c in zip(*rows, strict=True))
    features = FeatureBatch(hours.astype(np.int64), stock.astype(float),
                            statuses.astype(object), zips.astype(bool))
    one_hot = {"MISSING": 3, "OK": 4}
    matrix = np.zeros((len(rows), len(OLD_LAYOUT)), dtype=np.float32)
    for i, (h, s, p, z) in enumerate(rows):
        matrix[i, :3] = (h, s, z)
        matrix[i, one_hot.get(p, 5)] = 1.0
    return features, matrix


def save_tiny(out: Path, feature_order: list[str]) -> tuple[XGBClassifier, np.ndarray,
                                                             FeatureBatch]:
    features, matrix = old_layout_rows()
    targets = np.searchsorted(np.array(CLASSES), label(features).astype(str))
    classifier = XGBClassifier(n_estimators=4, max_depth=3, random_state=0, n_jobs=1)
    classifier.fit(matrix, targets)
    artifact.save(classifier, {
        "categories": {"payment_status": ["MISSING", "OK", UNSEEN_STATUS]},
        "classes": CLASSES,
        "features": ["order_hour_of_day", "inventory", "payment_status", "zip_code_available"],
        "feature_order": feature_order,
    }, out)
    return classifier, matrix, features


def test_an_artifact_with_the_raw_inventory_column_still_predicts_as_before(
        tmp_path: Path) -> None:
    classifier, matrix, features = save_tiny(tmp_path / "old", OLD_LAYOUT)
    loaded = artifact.load(tmp_path / "old")
    np.testing.assert_array_equal(loaded.design_matrix(features), matrix)
    _, proba = loaded.predict(features)
    np.testing.assert_array_equal(proba, classifier.predict_proba(matrix).astype(np.float32))


@pytest.mark.parametrize("name", ["stock_level", "payment_status"])
def test_an_unknown_design_column_is_refused_at_load(tmp_path: Path, name: str) -> None:
    save_tiny(tmp_path / "odd", [*OLD_LAYOUT[:1], name, *OLD_LAYOUT[2:]])
    with pytest.raises(ArtifactError, match=f"column '{name}'"):
        artifact.load(tmp_path / "odd")
