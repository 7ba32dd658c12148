"""Design columns by name: artifacts written with the raw ``inventory`` column still load and
predict as before, and a manifest naming a column this version cannot build is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from xgboost import XGBClassifier

from model import artifact
from model.artifact import UNSEEN_STATUS, ArtifactError
from model.features import FeatureBatch
from model.policy import label

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
