"""The model artifact: round trip, no pickle, tamper refusal, unknown categories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from triage.model import artifact
from triage.model.artifact import ArtifactError
from triage.model.features import FeatureBatch
from triage.model.orders import read_orders_csv
from triage.model.reference import ReferenceTables


def test_round_trip_predicts_like_the_trained_classifier(history: Path, model_dir: Path) -> None:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["metrics"]["holdout_accuracy"] >= 0.995
    assert sorted(manifest["classes"]) == sorted(
        ["Deliver", "HoldCheckAvailability", "HoldCheckDelivery", "HoldCheckPayment", "Decline"])
    assert manifest["files"]["model.json"] == artifact.sha256_of(model_dir / "model.json")
    assert manifest["version"].startswith("xgb-")

    loaded = artifact.load(model_dir)
    features = read_orders_csv(history / "orders.csv", limit=2000).features(
        ReferenceTables.load(history))
    recommendations, proba = loaded.predict(features)
    assert proba.dtype == np.float32 and proba.shape == (2000, 5)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    again = artifact.load(model_dir).predict(features)[0]
    assert recommendations.tolist() == again.tolist()


def test_small_calls_answer_from_the_row_memo_exactly_as_one_batch_call(
        history: Path, model_dir: Path) -> None:
    """One order at a time (an HTTP request) and a few at a time (a worker's batch under light
    load) give, bit for bit, the probabilities of one call over all of them; rows seen before
    are not predicted again, whatever the input's dtype."""
    loaded = artifact.load(model_dir)
    matrix = loaded.design_matrix(read_orders_csv(history / "orders.csv", limit=3000).features(
        ReferenceTables.load(history)))
    whole = loaded.predict_matrix(matrix)
    assert len(matrix) > artifact.SMALL_CALL_ROWS
    one_by_one = np.concatenate([loaded.predict_matrix(matrix[i:i + 1])
                                 for i in range(len(matrix))])
    np.testing.assert_array_equal(one_by_one, whole)
    distinct = len({row.tobytes() for row in matrix})
    assert loaded.memo.misses == distinct < len(matrix)  # each row predicted once
    few = artifact.SMALL_CALL_ROWS
    by_few = np.concatenate([loaded.predict_matrix(matrix[i:i + few].astype(np.float64))
                             for i in range(0, len(matrix), few)])
    np.testing.assert_array_equal(by_few, whole)  # float64 rows: the same rows, remembered
    assert loaded.memo.misses == distinct
    by_few[0] = -1.0  # an answer is the caller's own: the memo is not changed through it
    np.testing.assert_array_equal(loaded.predict_matrix(matrix[:1]), whole[:1])
    assert loaded.predict_matrix(matrix[:0]).shape == (0, len(loaded.classes))


def test_the_row_memo_keeps_its_newest_rows_and_answers_as_the_predictor() -> None:
    """Fewer slots than distinct rows: the least recently used go, answers never change, and a
    call's rows that are not remembered are predicted in one call."""
    def predict(m: np.ndarray) -> np.ndarray:
        calls.append(len(m))
        return np.stack([m.sum(axis=1), m.max(axis=1)], axis=1).astype(np.float32)

    calls: list[int] = []
    memo = artifact.RowMemo(rows=3, width=2)
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    rows[5] = np.nan  # NaN rows are rows like any other: the same bytes, the same answer
    for _ in range(4):
        for i in range(len(rows)):
            np.testing.assert_array_equal(memo.predict(rows[i:i + 1], predict),
                                          predict(rows[i:i + 1]))
            assert len(memo.slots) <= 3
    calls.clear()
    twice = rows[[4, 4, 5]]  # rows 4 and 5 were used last: still remembered
    np.testing.assert_array_equal(memo.predict(twice, predict), predict(twice)[:3])
    assert calls == [3]  # only the check's own call: no row of the memo's was predicted
    calls.clear()
    memo.predict(rows[[0, 1]], predict)  # both went long ago: one call for the two
    assert calls == [2] and len(memo.slots) == 3


def test_the_artifact_holds_no_pickle(model_dir: Path) -> None:
    for path in model_dir.iterdir():
        json.loads(path.read_text())  # every file is JSON text, nothing else
        assert not path.read_bytes().startswith(b"\x80")


def tampered_copy(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


def test_a_changed_model_file_is_refused(model_dir: Path, tmp_path: Path) -> None:
    copy = tampered_copy(model_dir, tmp_path)
    # Still valid JSON, still loadable by XGBoost: only the hash can tell.
    (copy / "model.json").write_text((copy / "model.json").read_text() + " ")
    with pytest.raises(ArtifactError, match="sha256"):
        artifact.load(copy)


def test_a_manifest_pointing_outside_the_directory_is_refused(model_dir: Path,
                                                             tmp_path: Path) -> None:
    copy = tampered_copy(model_dir, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = {"../model.json": "0" * 64}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside"):
        artifact.load(copy)


def test_a_missing_model_file_or_manifest_is_a_clear_error(model_dir: Path,
                                                          tmp_path: Path) -> None:
    copy = tampered_copy(model_dir, tmp_path)
    (copy / "model.json").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        artifact.load(copy)
    with pytest.raises(ArtifactError, match="triage train"):
        artifact.load(tmp_path / "nowhere")


def one(hour: int, stock: float, status: str, zip_ok: bool) -> FeatureBatch:
    return FeatureBatch(np.array([hour]), np.array([stock]), np.array([status], dtype=object),
                        np.array([zip_ok]))


@pytest.mark.parametrize("status", ["CHARGEBACK", "", "ok", "something new"])
def test_an_unseen_payment_status_is_scored_as_not_ok(model_dir: Path, status: str) -> None:
    """The policy holds every non-OK status for a payment check; so must the model, for
    statuses it never saw in training."""
    model = artifact.load(model_dir)
    assert status not in model.manifest["categories"]["payment_status"]
    recommendation, _ = model.predict(one(14, 25.0, status, True))
    assert recommendation.tolist() == ["HoldCheckPayment"]
    # The other rules still win over it, as in the policy.
    assert model.predict(one(14, 0.0, status, True))[0].tolist() == ["HoldCheckAvailability"]
    assert model.predict(one(14, 25.0, status, False))[0].tolist() == ["HoldCheckDelivery"]


def test_known_statuses_follow_the_policy(model_dir: Path) -> None:
    model = artifact.load(model_dir)
    assert model.predict(one(14, 25.0, "OK", True))[0].tolist() == ["Deliver"]
    assert model.predict(one(3, 25.0, "OK", True))[0].tolist() == ["Decline"]
    assert model.predict(one(14, 25.0, "MISSING", True))[0].tolist() == ["HoldCheckPayment"]
