"""Backtests from a data directory (consumer/backtest.py, no broker): the features of every
order equal an offline pandas.merge_asof, a candidate trained on mislabelled data shows as
worse than the active version and fails the promotion gate, --from/--to select the orders by
their own time, and the figures do not depend on the batch size (the backtest streams).
tests/integration/test_backtest.py has the backtest from Kafka."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.helpers import EXERCISE, oracle
from triage.bus.settings import ConnectionSettings
from triage.consumer import backtest as bt
from triage.model import artifact
from triage.model.features import FeatureBatch
from triage.model.policy import label
from triage.model.reference import ReferenceDataError
from triage.model.registry import PromotionRefused, Registry, check_backtest
from triage.producer.publisher import parse_timestamp_ms
from triage.schemas.codec import Codec, DecodeError
from triage.scoring.follower import changed, encode_state
from triage.scoring.settings import ValidationSettings
from triage.scoring.validation import OrderValidator


def backtest(candidate: Path, active: Path | None, data: Path, batch: int = bt.BATCH,
             from_ms: int | None = None, to_ms: int | None = None,
             seen: list[tuple[bt.Batch, FeatureBatch, np.ndarray]] | None = None
             ) -> bt.Backtest:
    ours = artifact.load(candidate)
    theirs = artifact.load(active) if active is not None else None
    tables, batches = bt.data_history(data, from_ms=from_ms, to_ms=to_ms, batch=batch)
    result = bt.Backtest(ours.version, theirs.version if theirs else None, "data", from_ms,
                         to_ms)
    return bt.run(ours, theirs, tables, batches, result,
                  on_batch=None if seen is None else lambda *a: seen.append(a))


def test_every_orders_features_equal_an_offline_merge_asof(history: Path,
                                                           model_dir: Path) -> None:
    seen: list[tuple[bt.Batch, FeatureBatch, np.ndarray]] = []
    result = backtest(model_dir, None, history, batch=7_000, seen=seen)
    expected = oracle(history)
    assert result.orders == len(expected) == sum(len(b.orders) for b, _, _ in seen)
    got = {name: np.concatenate([f.columns[name] for _, f, _ in seen])
           for name in ("order_hour_of_day", "inventory", "payment_status",
                        "zip_code_available")}
    np.testing.assert_array_equal(got["order_hour_of_day"], expected["order_hour_of_day"])
    np.testing.assert_array_equal(got["inventory"], expected["inventory"].to_numpy(float))
    assert got["payment_status"].tolist() == expected["payment_status"].tolist()
    assert got["zip_code_available"].tolist() == expected["zip_code_available"].tolist()
    # The policy agreement counted is the model's decisions against the policy's, recounted.
    decisions = np.concatenate([d for _, _, d in seen])
    policy = np.concatenate([label(f) for _, f, _ in seen])
    assert result.total.candidate == int((decisions == policy).sum())


def test_a_candidate_trained_on_mislabelled_data_shows_worse_and_fails_the_gate(
        history: Path, registry: tuple[Registry, str, str, str]) -> None:
    reg, v1, _, bad = registry
    result = backtest(reg.path(bad), reg.path(v1), history)
    report = result.as_dict()
    assert report["active"] == v1 and report["candidate"] == bad
    assert report["candidate_policy_agreement"] < report["active_policy_agreement"] - 0.05
    changed = sum(n for row in report["changed_by_class"].values() for n in row.values())
    assert changed == result.orders - int(np.trace(result.active_vs_candidate)) > 0
    assert 0 < len(report["examples"]) <= bt.EXAMPLES
    with pytest.raises(PromotionRefused, match="agreed with the policy"):
        check_backtest(bad, report, v1, min_agreement=0.5)
    good = backtest(reg.path(v1), reg.path(v1), history).as_dict()
    assert not check_backtest(v1, good, v1, min_agreement=0.9)


def test_from_and_to_select_the_orders_by_their_own_time(history: Path,
                                                         model_dir: Path) -> None:
    times = pd.to_datetime(pd.read_csv(history / "orders.csv", dtype=str)["timestamp"])
    start, end = times.quantile(0.25).floor("s"), times.quantile(0.5).floor("s")
    result = backtest(model_dir, None, history,
                      from_ms=parse_timestamp_ms(str(start)), to_ms=parse_timestamp_ms(str(end)))
    assert result.orders == int(((times >= start) & (times <= end)).sum()) > 0
    assert result.first_ms >= start.value // 1_000_000
    assert result.last_ms <= end.value // 1_000_000


def test_the_figures_do_not_depend_on_the_batch_size(history: Path, model_dir: Path) -> None:
    whole = backtest(model_dir, model_dir, history).as_dict()
    streamed = backtest(model_dir, model_dir, history, batch=1_234).as_dict()
    for key in ("orders", "candidate_policy_agreement", "confusion", "by_hour", "by_class",
                "first_order_ms", "last_order_ms"):
        assert streamed[key] == whole[key], key


def test_orders_the_workers_would_dead_letter_are_counted_not_scored(
        model_dir: Path, tmp_path: Path) -> None:
    """An order far in the future decodes, but the workers dead-letter it (and a datetime of
    its hour does not exist): the backtest must not score it, nor stop on it."""
    data = tmp_path / "data"
    shutil.copytree(EXERCISE, data)
    with open(data / "orders.csv", "a", encoding="utf-8") as f:
        # the exercise's columns: order_id, customer_id, timestamp, sku_code, quantity, ...
        f.write("bad-1,c,9999-12-31 23:59:59,SKU,1,00000,False\r\n")  # far in the future
        f.write("bad-2,c,2021-07-01 10:00:00,,1,00000,False\r\n")     # no sku_code
    ours = artifact.load(model_dir)
    tables, batches = bt.data_history(data)
    result = bt.run(ours, None, tables, batches, bt.Backtest(ours.version, None, "data", None,
                                                             None),
                    validator=OrderValidator(ValidationSettings()))
    assert result.refused == {"invalid_timestamp": 1, "missing_field": 1}
    assert result.orders == len(pd.read_csv(EXERCISE / "orders.csv"))
    assert all(e["order_id"] not in ("bad-1", "bad-2") for e in result.examples)


def test_the_gate_asks_for_enough_orders_the_same_active_version_and_the_floor() -> None:
    report = {"id": "bt-x", "candidate": "c", "active": "a", "orders": 5_000,
              "candidate_policy_agreement": 0.9955, "active_policy_agreement": 0.996}
    assert not check_backtest("c", report, "a", min_agreement=0.99)  # 0.05 points below
    with pytest.raises(PromotionRefused, match=r"more than 0\.1% below"):
        check_backtest("c", {**report, "candidate_policy_agreement": 0.9948}, "a", 0.99)
    with pytest.raises(PromotionRefused, match="fewer than 1,000"):
        check_backtest("c", {**report, "orders": 999}, "a", 0.99)
    with pytest.raises(PromotionRefused, match="not with the active b"):
        check_backtest("c", report, "b", 0.99)
    with pytest.raises(PromotionRefused, match="below --min-agreement"):
        check_backtest("c", report, "a", 0.999)
    with pytest.raises(PromotionRefused, match="has no backtest"):
        check_backtest("c", None, "a", 0.99)
    assert check_backtest("c", None, "a", 0.99, force=True)  # forced past it


def test_the_registry_keeps_backtests_beside_the_versions(
        history: Path, registry: tuple[Registry, str, str, str]) -> None:
    reg, v1, v2, _ = registry
    first = backtest(reg.path(v2), reg.path(v1), history, batch=5_000)
    second = backtest(reg.path(v2), reg.path(v1), history)
    reg.save_backtest(first.as_dict())
    reg.save_backtest(second.as_dict())
    assert first.id < second.id and reg.latest_backtest(v2)["id"] == second.id
    assert reg.latest_backtest(v1) is None
    assert {v.version for v in reg.versions()} >= {v1, v2}  # backtests/ is not a version
    assert all(v.complete for v in reg.versions() if v.version in (v1, v2))



def test_orders_csv_is_read_one_batch_at_a_time(history: Path, model_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The backtest streams: no read of orders.csv holds more than one batch of its rows (a
    check of the whole file first held all of them: a backtest of 4,000,000 orders peaked at
    2.0 times the resident memory of one of 1,000,000, docs/benchmarks.md)."""
    rows: list[int] = []
    read_csv = pd.read_csv

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        result = read_csv(path, *args, **kwargs)
        if Path(str(path)).name != "orders.csv":
            return result
        if kwargs.get("chunksize") is None:
            rows.append(len(result))
            return result
        return (rows.append(len(frame)) or frame for frame in result)

    monkeypatch.setattr(pd, "read_csv", counting)
    result = backtest(model_dir, None, history, batch=3_000)
    assert result.orders == 20_000
    assert max(rows) <= 3_000 and sum(rows) == 20_000, rows


def test_a_bad_row_of_orders_csv_is_refused_with_its_line(history: Path,
                                                          tmp_path: Path) -> None:
    """Rows are checked as they are read: a byte that is not UTF-8, or a line of too many
    fields, stops the backtest with the file and the line, as the check of the whole file
    before did."""
    changes: dict[str, Callable[[bytes], bytes]] = {
        "not utf-8": lambda line: line.replace(b"O-", b"\xff-", 1),
        "too many fields": lambda line: line + b",x,y"}
    for name, change in changes.items():
        data = tmp_path / name.replace(" ", "-")
        shutil.copytree(history, data)
        lines = (data / "orders.csv").read_bytes().split(b"\n")
        lines[7_000] = change(lines[7_000])  # line 7,001 of the file, in the third batch
        (data / "orders.csv").write_bytes(b"\n".join(lines))
        with pytest.raises(ReferenceDataError, match=r"orders\.csv .*line 7001"):
            _, batches = bt.data_history(data, batch=3_000)
            for _ in batches:
                pass


def test_a_state_without_a_backtest_is_readable_by_workers_that_predate_the_field() -> None:
    """Rolling upgrades: a worker of before the backtest field knows only the first version
    of the control topic's contract; a promotion that needs no backtest is written with it."""
    connection = ConnectionSettings()
    plain = encode_state(connection, "models.control", changed("xgb-1", None, "promote", "me"))
    old_worker = Codec("history/model_state.1")
    assert old_worker.decode(plain)["active"] == "xgb-1"
    gated = encode_state(connection, "models.control",
                         changed("xgb-2", "xgb-1", "promote", "me", backtest="bt-1"))
    with pytest.raises(DecodeError):
        old_worker.decode(gated)  # only a gated promotion needs the new contract
    new_worker = Codec("model_state")
    assert new_worker.decode(plain)["backtest"] is None
    assert new_worker.decode(gated)["backtest"] == "bt-1"
