"""model_v2: the customer-bursts scenario of ``triage datagen``, policy v2 trained on the four
features and the windowed ones (``triage train --windowed all --policy v2``), and the drift
checks of the windowed features, which only a model that reads them has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from triage.cli import main
from triage.model import artifact
from triage.model.datagen import generate
from triage.model.drift import CHECKS, DriftError, Reference, evaluate
from triage.model.features import WINDOWED_NAMES
from triage.model.orders import read_orders_csv
from triage.model.policy import BURST_ORDERS_1H, label, label_v2
from triage.model.reference import ReferenceTables
from triage.model.train import TrainingError, train

SEED = 11  # the history fixture's (tests/conftest.py): the same store, with bursts


@pytest.fixture(scope="module")
def bursts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bursts")
    generate(20_000, SEED, path, shift="customer-bursts")
    return path


@pytest.fixture(scope="module")
def v2_dir(history: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model_v2, trained on the store without bursts (they are the drift to find)."""
    path = tmp_path_factory.mktemp("v2")
    train(history, path, windowed=WINDOWED_NAMES, policy="v2")
    return path


def test_bursts_give_customers_orders_in_quick_succession_and_change_nothing_else(
        history: Path, bursts: Path) -> None:
    plain, shifted = (pd.read_csv(p / "orders.csv", dtype=str) for p in (history, bursts))
    moved = plain["customer_id"] != shifted["customer_id"]
    assert 0.015 < moved.mean() < 0.03  # 4 of each burst's 5 orders change customer
    assert plain.drop(columns="customer_id").equals(shifted.drop(columns="customer_id"))
    for name in ("payments.csv", "inventory.csv", "zip_codes.csv"):
        assert (history / name).read_bytes() == (bursts / name).read_bytes()
    counts = [read_orders_csv(p / "orders.csv").windowed_values(["customer_orders_1h"])[
        "customer_orders_1h"] for p in (history, bursts)]
    assert (counts[1] >= BURST_ORDERS_1H).sum() > 10 * max(1, (counts[0] >=
                                                               BURST_ORDERS_1H).sum())


def test_model_v2_learns_policy_v2_and_reads_the_windowed_features(
        bursts: Path, tmp_path: Path) -> None:
    report = train(bursts, tmp_path / "v2", windowed=WINDOWED_NAMES, policy="v2")
    assert report.holdout_accuracy >= 0.995
    model = artifact.load(tmp_path / "v2")
    assert model.windowed == WINDOWED_NAMES and model.manifest["policy"] == "v2"
    orders = read_orders_csv(bursts / "orders.csv")
    features = orders.features(ReferenceTables.load(bursts), WINDOWED_NAMES)
    v1, v2 = label(features), label_v2(features)
    assert (v1 != v2).sum() > 100  # the bursts v1 delivers
    predicted, _ = model.predict(features)
    assert (predicted == v2).mean() >= 0.999
    assert (predicted[v1 != v2] == "Decline").all()


def test_policy_v2_trains_on_the_windowed_feature_it_decides_on_and_says_it_needs_the_stage(
        bursts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # no --windowed: it reads it all the same, and says what its scorers need (a new user's
    # trial found nothing said so)
    assert main(["train", "--data", str(bursts), "--out", str(tmp_path / "m"),
                 "--policy", "v2"]) == 0
    assert artifact.load(tmp_path / "m").windowed == ("customer_orders_1h",)
    out = capsys.readouterr().out
    assert "reads the windowed features customer_orders_1h" in out
    assert "`triage windows`" in out
    with pytest.raises(TrainingError, match="unknown policy 'v9'"):
        train(bursts, tmp_path / "x", policy="v9")


def test_only_a_model_that_reads_windowed_features_has_their_drift_checks(
        model_dir: Path, v2_dir: Path) -> None:
    v1 = [c.name for c in Reference.from_manifest(artifact.verify(model_dir)).checks]
    v2 = [c.name for c in Reference.from_manifest(artifact.verify(v2_dir)).checks]
    assert tuple(v1) == CHECKS  # model_v1's monitoring is as it was
    assert v2 == [*CHECKS[:-1], *WINDOWED_NAMES, "recommendation"]


def test_bursts_are_detected_on_customer_orders_1h_and_the_store_as_trained_is_quiet(
        history: Path, bursts: Path, v2_dir: Path) -> None:
    """40 random windows of 1,000 orders each: of the training rows themselves (the null
    here: the same store, as test_drift_stats' training-rows check), at most 5% raise any
    alarm; with bursts, customer_orders_1h alarms in at least 85% (measured when written: 1
    window of 50 alarmed without bursts, 47 of 50 with)."""
    model = artifact.load(v2_dir)
    reference = Reference.from_manifest(model.manifest)
    rng = np.random.default_rng(1)
    alarms: dict[bool, list[set[str]]] = {}
    for shifted, path in ((False, history), (True, bursts)):
        features = read_orders_csv(path / "orders.csv").features(ReferenceTables.load(path),
                                                                 WINDOWED_NAMES)
        for _ in range(40):
            window = features.take(rng.choice(len(features), 1000, replace=False))
            result = evaluate(reference, window, model.predict(window)[0])
            alarms.setdefault(shifted, []).append({c.name for c in result.drifted})
    assert sum(bool(found) for found in alarms[False]) <= 2  # 5% of 40
    assert sum("customer_orders_1h" in found for found in alarms[True]) >= 34  # 85%


def test_unknown_counts_have_a_bin_of_their_own_and_an_older_baseline_is_refused(
        v2_dir: Path, history: Path) -> None:
    """Training never has a null count (no earlier order is 0): unknown values (the join could
    not know them) must show as themselves, not as a shift of the known ones. A manifest
    whose baseline lacks a windowed check's bins asks for a retrain, never a silent pass."""
    model = artifact.load(v2_dir)
    reference = Reference.from_manifest(model.manifest)
    (check,) = [c for c in reference.checks if c.name == "customer_orders_1h"]
    assert "null" in check.labels
    features = read_orders_csv(history / "orders.csv").features(
        ReferenceTables.load(history), WINDOWED_NAMES).take(np.arange(1000))
    features.columns["customer_orders_1h"][:200] = np.nan
    counts, _ = check.count(features, np.array([]))
    assert counts[check.labels.index("null")] == 200
    manifest = dict(model.manifest)
    manifest["baseline"] = {k: v for k, v in manifest["baseline"].items()
                            if k != "customer_orders_1h"}
    with pytest.raises(DriftError, match="customer_orders_1h"):
        Reference.from_manifest(manifest)
