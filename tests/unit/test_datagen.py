"""The generated data has the shapes DESIGN.md asks for, with ``pandas.merge_asof`` as the oracle.

Every as-of quantity here is computed independently of the project's own feature code, so these
tests say what the data is, not what our join thinks it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from triage.model.datagen import CSV_FILES, generate

N_ORDERS = 20_000
SEED = 11
WEEKS = 4
START = pd.Timestamp("2026-01-05 00:00:00")
END = START + pd.Timedelta(weeks=WEEKS)
TS_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
CLASSES = ("HoldCheckAvailability", "HoldCheckDelivery", "HoldCheckPayment", "Decline", "Deliver")


@dataclass(frozen=True)
class Data:
    paths: dict[str, Path]
    orders: pd.DataFrame
    payments: pd.DataFrame
    inventory: pd.DataFrame
    zips: pd.DataFrame


def _load(paths: dict[str, Path]) -> Data:
    """Read the CSVs the way a user would: codes stay strings, timestamps are parsed strictly."""

    def read(name: str, ts_col: str) -> pd.DataFrame:
        df = pd.read_csv(paths[name], dtype=str, keep_default_na=False)
        df[ts_col] = pd.to_datetime(df[ts_col], format="%Y-%m-%d %H:%M:%S")
        return df

    inventory = read("inventory.csv", "timestamp")
    inventory["inventory"] = inventory["inventory"].astype(np.int64)
    return Data(
        paths=paths,
        orders=read("orders.csv", "timestamp"),
        payments=read("payments.csv", "timestamp"),
        inventory=inventory,
        zips=read("zip_codes.csv", "available_from"),
    )


def _features(data: Data, *, allow_exact_matches: bool = True) -> pd.DataFrame:
    """DESIGN.md's features by ``merge_asof(direction="backward")``, plus the policy's class."""
    asof = {"left_on": "timestamp", "direction": "backward",
            "allow_exact_matches": allow_exact_matches}
    f = pd.merge_asof(
        data.orders,
        data.inventory.rename(columns={"timestamp": "inventory_ts"}),
        right_on="inventory_ts", by="sku_code", **asof,
    )
    f = pd.merge_asof(
        f,
        data.payments.rename(columns={"timestamp": "payment_ts"}),
        right_on="payment_ts", by="order_id", **asof,
    )
    f = f.merge(data.zips, on="zip_code", how="left", validate="many_to_one")
    f["payment_status"] = f["payment_status"].fillna("MISSING")
    f["zip_code_available"] = (f["timestamp"] > f["available_from"]).fillna(False).astype(bool)
    f["order_hour_of_day"] = f["timestamp"].dt.hour
    inventory_bad = f["inventory"].isna() | (f["inventory"] <= 0)
    f["inventory_bad"] = inventory_bad
    f["recommendation"] = np.select(
        [
            inventory_bad,
            ~f["zip_code_available"],
            f["payment_status"] != "OK",
            f["order_hour_of_day"] < 6,
        ],
        list(CLASSES[:4]),
        CLASSES[4],
    )
    return f


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    return _load(generate(N_ORDERS, SEED, tmp_path_factory.mktemp("datagen"), weeks=WEEKS))


@pytest.fixture(scope="module")
def features(data: Data) -> pd.DataFrame:
    return _features(data)


def _bytes(paths: dict[str, Path]) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in paths.items()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    first = _bytes(generate(3_000, 5, tmp_path / "a"))
    again = _bytes(generate(3_000, 5, tmp_path / "b"))
    other = _bytes(generate(3_000, 6, tmp_path / "c"))
    assert set(first) == set(CSV_FILES)
    assert first == again
    for name in CSV_FILES:
        assert first[name] != other[name], name


def test_file_formats(data: Data) -> None:
    assert list(data.paths) == list(CSV_FILES)
    headers = {
        "orders.csv": "order_id,customer_id,timestamp,sku_code,zip_code",
        "payments.csv": "order_id,timestamp,payment_status",
        "inventory.csv": "sku_code,timestamp,inventory",
        "zip_codes.csv": "zip_code,available_from",
    }
    for name, header in headers.items():
        text = data.paths[name].read_text()
        assert "\r" not in text
        lines = text.split("\n")
        assert lines[0] == header
        assert lines[-1] == ""
        ts_col = header.split(",").index("available_from" if "zip_codes" in name else "timestamp")
        assert all(TS_PATTERN.fullmatch(line.split(",")[ts_col]) for line in lines[1:-1]), name

    orders = data.orders
    assert len(orders) == N_ORDERS
    assert orders["order_id"].is_unique
    assert orders["order_id"].str.fullmatch(r"O-\d{9}-[0-9a-f]{4}").all()
    assert orders["customer_id"].str.fullmatch(r"C-\d{6,}").all()
    assert orders["sku_code"].str.fullmatch(r"SKU-\d{5}").all()
    by_time = orders.sort_values(["timestamp", "order_id"], kind="stable")
    assert by_time.index.equals(orders.index)
    assert orders["timestamp"].duplicated().any()  # ties between orders exist too

    # Zip codes are 5-digit strings and some have a leading zero that must survive.
    for zips in (orders["zip_code"], data.zips["zip_code"]):
        assert zips.str.fullmatch(r"\d{5}").all()
        assert zips.str.startswith("0").any()
    assert data.zips["zip_code"].is_unique

    # Drawn from n/3 customers of uneven activity, many of whom come back.
    per_customer = orders["customer_id"].value_counts()
    assert N_ORDERS / 6 < len(per_customer) <= N_ORDERS / 3
    assert (per_customer >= 2).sum() > len(per_customer) / 3

    for df in (data.payments, data.inventory):
        assert df["timestamp"].is_monotonic_increasing
    assert set(data.payments["order_id"]) <= set(orders["order_id"])


def test_skus_are_many_and_popularity_is_skewed(data: Data) -> None:
    assert data.inventory["sku_code"].nunique() >= 2_500
    per_sku = data.orders["sku_code"].value_counts()
    assert len(per_sku) >= 1_000
    top_1_percent = per_sku.iloc[: len(per_sku) // 100].sum()
    assert top_1_percent > 0.25 * N_ORDERS
    assert per_sku.iloc[0] > 50 * per_sku.median()


def test_stock_runs_out_and_is_restocked(data: Data) -> None:
    inv = data.inventory
    assert (inv["inventory"] == 0).any()
    assert (inv["inventory"] < 0).any()
    assert inv["inventory"].max() > 50
    # A SKU is restocked when a row <= 0 is followed by a row > 0.
    out = (inv["inventory"] <= 0).groupby(inv["sku_code"]).shift(fill_value=False)
    restocked = inv.loc[out & (inv["inventory"] > 0), "sku_code"].nunique()
    assert restocked > 0.3 * inv["sku_code"].nunique()


def test_stock_history_starts_before_orders_for_most_skus(data: Data) -> None:
    first_stock = data.inventory.groupby("sku_code")["timestamp"].min()
    first_order = data.orders.groupby("sku_code")["timestamp"].min()
    both = pd.concat({"stock": first_stock, "order": first_order}, axis=1, join="inner")
    assert (both["stock"] < both["order"]).mean() > 0.85
    assert (first_stock < START).mean() > 0.85

    # Some SKUs start stocking only mid-period, and are ordered before that.
    late = first_stock[first_stock > START + pd.Timedelta(days=1)]
    assert len(late) > 0.02 * len(first_stock)
    ordered_early = both.loc[both.index.isin(late.index)]
    assert (ordered_early["order"] < ordered_early["stock"]).sum() >= 5


def test_zip_codes_roll_out_over_time(data: Data) -> None:
    available = data.zips["available_from"]
    assert 800 <= len(available) <= 1_200
    assert (available < START).mean() > 0.75
    assert ((available >= START) & (available < END)).mean() > 0.05


def test_payment_histories(data: Data, features: pd.DataFrame) -> None:
    statuses = set(data.payments["payment_status"])
    assert "OK" in statuses
    assert len(statuses - {"OK"}) >= 3

    events = data.payments.groupby("order_id").size()
    assert (events >= 2).sum() > 0.05 * N_ORDERS
    sequences = data.payments.groupby("order_id")["payment_status"].agg(tuple)
    assert (sequences == ("PENDING", "OK")).any()

    no_record = ~data.orders["order_id"].isin(events.index)
    assert 0.015 < no_record.mean() < 0.05

    # Orders whose first payment event comes after the order: MISSING as of the order.
    first_event = data.payments.groupby("order_id")["timestamp"].min()
    order_ts = data.orders.set_index("order_id")["timestamp"]
    late_first = (first_event > order_ts.reindex(first_event.index)).sum()
    assert late_first > 0.001 * N_ORDERS
    missing = (features["payment_status"] == "MISSING").sum()
    assert missing == no_record.sum() + late_first

    # Orders that already have a status also get events after the order (they must not count).
    events_vs_order = data.payments.merge(
        data.orders[["order_id", "timestamp"]], on="order_id", suffixes=("", "_order")
    )
    later = events_vs_order.loc[events_vs_order["timestamp"] > events_vs_order["timestamp_order"]]
    with_status = features.loc[features["payment_status"] != "MISSING", "order_id"]
    assert later["order_id"].isin(with_status).sum() > 0.005 * N_ORDERS


def test_unknown_skus_and_zip_codes(data: Data) -> None:
    unknown_sku = ~data.orders["sku_code"].isin(set(data.inventory["sku_code"]))
    unknown_zip = ~data.orders["zip_code"].isin(set(data.zips["zip_code"]))
    assert 0.005 < unknown_sku.mean() < 0.02
    assert 0.005 < unknown_zip.mean() < 0.02


def test_orders_follow_a_daily_cycle(data: Data) -> None:
    ts = data.orders["timestamp"]
    assert ts.min() >= START
    assert ts.max() < END
    assert ts.dt.normalize().nunique() == WEEKS * 7
    per_hour = ts.dt.hour.value_counts().reindex(range(24), fill_value=0)
    assert 0.06 < per_hour.loc[0:5].sum() / N_ORDERS < 0.10
    assert per_hour.loc[10:21].mean() > 3 * per_hour.loc[1:5].mean()


def test_weeks_and_start_shape_the_period(tmp_path: Path) -> None:
    start = pd.Timestamp("2026-03-02 13:30:00")
    orders = _load(generate(5_000, 3, tmp_path, weeks=1, start=str(start))).orders
    assert orders["timestamp"].min() >= start
    assert orders["timestamp"].max() < start + pd.Timedelta(weeks=1)
    # The cycle follows the UTC clock, not the offset from `start`.
    assert 0.05 < (orders["timestamp"].dt.hour < 6).mean() < 0.11


def test_exact_timestamp_ties(data: Data, features: pd.DataFrame) -> None:
    orders = data.orders

    # Payment events at exactly the order's second.
    paid_at = orders.merge(data.payments, on=["order_id", "timestamp"])
    assert len(paid_at) > 0.02 * N_ORDERS

    # Inventory rows at exactly the second of an order for that SKU.
    stock_at = orders.merge(data.inventory, on=["sku_code", "timestamp"])
    assert stock_at["order_id"].nunique() > 0.01 * N_ORDERS

    # Two inventory rows of one SKU in the same second, with different levels; some of them
    # at an order's second, where the later row in the file is the one that counts.
    levels = data.inventory.groupby(["sku_code", "timestamp"])["inventory"].nunique()
    doubled = levels[levels > 1].reset_index()[["sku_code", "timestamp"]]
    assert doubled["sku_code"].nunique() >= 10
    assert len(orders.merge(doubled, on=["sku_code", "timestamp"])) >= 5

    # Zips that become available at exactly the second of one of their orders.
    rolled_at = orders.merge(
        data.zips, left_on=["zip_code", "timestamp"], right_on=["zip_code", "available_from"]
    )
    assert rolled_at["zip_code"].nunique() >= 5
    assert not features.loc[features["timestamp"] == features["available_from"],
                            "zip_code_available"].any()

    # The ties matter: a join that ignores rows at the order's own second disagrees.
    strict = _features(data, allow_exact_matches=False)
    assert (strict["inventory_bad"] != features["inventory_bad"]).sum() >= 20
    assert (strict["payment_status"] != features["payment_status"]).sum() >= 20


def test_as_of_rates(features: pd.DataFrame) -> None:
    assert 0.05 < features["inventory_bad"].mean() < 0.12
    assert 0.06 < (~features["zip_code_available"]).mean() < 0.14
    assert 0.03 < (features["payment_status"] != "OK").mean() < 0.08
    assert 0.06 < (features["order_hour_of_day"] < 6).mean() < 0.10


def test_every_policy_class_is_well_represented(features: pd.DataFrame) -> None:
    shares = features["recommendation"].value_counts(normalize=True)
    assert set(shares.index) == set(CLASSES)
    assert shares.min() >= 0.02
