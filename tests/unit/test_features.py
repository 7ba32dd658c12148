"""The streaming feature code against the oracle: pandas.merge_asof(direction="backward")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import oracle
from triage.model.datagen import generate
from triage.model.features import FeatureBatch
from triage.model.orders import read_orders_csv
from triage.model.reference import ReferenceTables


def streaming(data_dir: Path) -> FeatureBatch:
    return read_orders_csv(data_dir / "orders.csv").features(ReferenceTables.load(data_dir))


def assert_identical(features: FeatureBatch, expected: pd.DataFrame) -> None:
    assert len(features) == len(expected)
    np.testing.assert_array_equal(features.order_hour_of_day, expected["order_hour_of_day"])
    np.testing.assert_array_equal(features.inventory, expected["inventory"].to_numpy(float))
    np.testing.assert_array_equal(features.payment_status.astype(str),
                                  expected["payment_status"].to_numpy(str))
    np.testing.assert_array_equal(features.zip_code_available,
                                  expected["zip_code_available"].to_numpy(bool))


@pytest.mark.parametrize("seed", [1, 2])
def test_generated_history_matches_merge_asof_row_for_row(tmp_path: Path, seed: int) -> None:
    generate(8_000, seed, tmp_path)
    expected = oracle(tmp_path)
    # The generated data must exercise the hard cases, or this test proves little.
    assert expected["inventory"].isna().any()
    assert (expected["payment_status"] == "MISSING").any()
    assert expected["available_from"].isna().any()  # unknown zips
    assert_identical(streaming(tmp_path), expected)


def write(path: Path, name: str, header: str, rows: list[str]) -> None:
    (path / name).write_text("\n".join([header, *rows]) + "\n")


def test_hand_made_edge_cases_match_merge_asof(tmp_path: Path) -> None:
    write(tmp_path, "orders.csv", "order_id,customer_id,timestamp,sku_code,zip_code", [
        "o1,c1,2026-01-01 10:00:00,A,10001",   # exact tie with an inventory row and a payment
        "o2,c1,2026-01-01 09:59:59,A,10001",   # one second before the first stock row
        "o3,c2,2026-01-01 12:00:00,B,10002",   # two stock rows at the same second: last wins
        "o4,c2,2026-01-01 12:00:00,NOPE,99999",  # unknown SKU and unknown zip
        "o5,c3,2026-01-01 00:30:00,B,10002",   # zip available_from equals the order time
        "o6,c3,2026-01-02 23:59:59,A,10001",   # payment only after the order
    ])
    write(tmp_path, "inventory.csv", "sku_code,timestamp,inventory", [
        "A,2026-01-01 10:00:00,5",
        "B,2026-01-01 00:00:00,3",
        "B,2026-01-01 12:00:00,7",
        "B,2026-01-01 12:00:00,-2",
        "A,2026-01-02 00:00:00,0",
    ])
    write(tmp_path, "payments.csv", "order_id,timestamp,payment_status", [
        "o1,2026-01-01 09:00:00,PENDING",
        "o1,2026-01-01 10:00:00,OK",
        "o3,2026-01-01 11:00:00,DECLINED",
        "o3,2026-01-01 11:00:00,OK",
        "o6,2026-01-03 00:00:00,OK",
    ])
    write(tmp_path, "zip_codes.csv", "zip_code,available_from", [
        "10001,2025-12-01 00:00:00",
        "10002,2026-01-01 00:30:00",
    ])
    features = streaming(tmp_path)
    assert_identical(features, oracle(tmp_path))
    # And, spelled out, what the definitions say for these rows:
    assert features.inventory[0] == 5.0 and features.inventory[2] == -2.0
    assert np.isnan(features.inventory[1]) and np.isnan(features.inventory[3])
    assert features.payment_status.tolist() == ["OK", "MISSING", "OK", "MISSING", "MISSING",
                                                "MISSING"]
    assert features.zip_code_available.tolist() == [True, True, True, False, False, True]
    assert features.order_hour_of_day.tolist() == [10, 9, 12, 12, 0, 23]


def test_sub_second_order_times_compare_at_their_own_precision(tmp_path: Path) -> None:
    """Orders from Kafka carry milliseconds: a stock row at 10:00:00 applies from 10:00:00.000
    on, and a zip rolled out at 10:00:00 is served at 10:00:00.001 (strictly after), not at
    10:00:00.000."""
    write(tmp_path, "inventory.csv", "sku_code,timestamp,inventory", ["A,2026-01-01 10:00:00,4"])
    write(tmp_path, "payments.csv", "order_id,timestamp,payment_status", [])
    write(tmp_path, "zip_codes.csv", "zip_code,available_from", ["1,2026-01-01 10:00:00"])
    reference = ReferenceTables.load(tmp_path)
    from triage.model.features import compute_features

    at = pd.Timestamp("2026-01-01 10:00:00").value // 1_000_000
    features = compute_features(reference, ["x", "y", "z"], ["A", "A", "A"], ["1", "1", "1"],
                                np.array([at + 1, at - 1, at]))
    assert features.inventory[0] == 4.0 and np.isnan(features.inventory[1])
    assert features.inventory[2] == 4.0
    assert features.zip_code_available.tolist() == [True, False, False]


@pytest.mark.parametrize("contract", ["prediction", "drift_sample"])
def test_the_contracts_hold_exactly_the_declared_features(contract: str) -> None:
    """The Avro contracts carry the features as model/features.py declares them: names,
    order and types. A feature added there and not here (or the reverse) fails."""
    import json
    from importlib import resources

    from triage.model.features import FEATURES

    schema = json.loads(resources.files("triage.schemas").joinpath(f"{contract}.avsc")
                        .read_text())
    (features,) = [f for f in schema["fields"] if f["name"] == "features"]
    assert [(f["name"], f["type"]) for f in features["type"]["fields"]] == [
        (f.name, f.avro) for f in FEATURES]


def test_feature_records_round_trip_through_the_declared_columns(tmp_path: Path) -> None:
    from triage.model.features import FeatureBatch

    generate(300, 5, tmp_path)
    features = streaming(tmp_path)
    back = FeatureBatch.from_values({name: [r[name] for r in features.records()]
                                     for name, _ in features})
    assert_identical(back, pd.DataFrame({name: column for name, column in features}))
    assert any(r["inventory"] is None for r in features.records())  # NaN travels as null
