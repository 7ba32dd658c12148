"""The scorer's join with the feature stage (scoring/windowed.py) in the scoring core, without a
broker: orders wait for the stage's answers, are scored with them, say so when the max wait ran
out or the stage could not know, and are corrected when a later answer changes them; revision 0
never stands above another."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.unit.test_reference import order_items
from triage.model import artifact
from triage.model.artifact import Model
from triage.model.features import WINDOWED_NAMES
from triage.model.reference import ReferenceTables
from triage.model.train import train
from triage.model.windows import WINDOWED_FEATURES
from triage.schemas.codec import Codec
from triage.scoring.core import CoreConfig, ScoringCore
from triage.scoring.corrections import RetainedOrders, kept_from_records
from triage.scoring.windowed import BEHIND_WAITS, WindowedJoin

T = 1_767_225_600_000  # 2026-01-01 00:00 UTC
MAX_WAIT_S = 5.0
CUSTOMER = [w.name for w in WINDOWED_FEATURES if w.entity == "customer_id"]
SKU = [w.name for w in WINDOWED_FEATURES if w.entity == "sku_code"]


@pytest.fixture(scope="module")
def windowed_model(history: Path, tmp_path_factory: pytest.TempPathFactory) -> Model:
    path = tmp_path_factory.mktemp("windowed-model")
    train(history, path, windowed=WINDOWED_NAMES, min_accuracy=0.0)
    return artifact.load(path)


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def core_for(model: Model, history: Path, names: tuple[str, ...] = WINDOWED_NAMES
             ) -> tuple[ScoringCore, WindowedJoin, Monotonic]:
    monotonic = Monotonic()
    core = ScoringCore(model, ReferenceTables.load(history), Codec("order"),
                       config=CoreConfig(sample_rate=0.0), retained=RetainedOrders(120_000),
                       clock=lambda: T + 60_000, monotonic=monotonic)
    join = WindowedJoin(names, max_wait_s=MAX_WAIT_S, retention_ms=3_600_000)
    core.windowed = join
    return core, join, monotonic


def order(order_id: str, customer: str = "C-1", sku: str = "S-1", at: int = T) -> dict:
    return {"order_id": order_id, "customer_id": customer, "timestamp_ms": at,
            "sku_code": sku, "zip_code": "00501"}


def answer(order_id: str, entity: str, value: str, values: dict[str, float | None],
           revision: int = 1, expired: bool = False, at: int = T) -> dict[str, Any]:
    return {"order_id": order_id, "timestamp_ms": at, "entity": entity, "entity_value": value,
            "revision": revision, "window_expired": expired,
            "values": {name: None if expired else values.get(name) for name in values}}


def customer_answer(order_id: str, orders_1h: float, revision: int = 1,
                    expired: bool = False) -> dict[str, Any]:
    return answer(order_id, "customer_id", "C-1",
                  {"customer_orders_1h": orders_1h, "customer_zip_codes_7d": 2.0,
                   "customer_seconds_since_last": 30.0}, revision, expired)


def sku_answer(order_id: str, orders_10m: float = 4.0, revision: int = 1) -> dict[str, Any]:
    return answer(order_id, "sku_code", "S-1", {"sku_orders_10m": orders_10m}, revision)


def windowed(record: dict[str, Any]) -> dict[str, Any]:
    return {name: record["features"][name] for name in WINDOWED_NAMES}


def test_an_order_waits_for_every_joined_store_then_carries_its_answers(
        windowed_model: Model, history: Path) -> None:
    core, join, _ = core_for(windowed_model, history)
    items = order_items([order("o-1")])
    first = core.process(items)
    assert first.predictions == [] and first.deferred == items  # no answer yet
    join.apply([customer_answer("o-1", 3.0)])
    assert core.process([]).predictions == []  # the SKU store has not answered
    assert core.waiting_offsets() == {(items[0].source.topic, 3): items[0].source.offset}
    join.apply([sku_answer("o-1")])
    (scored,) = core.process([]).predictions
    assert windowed(scored.record) == {"customer_orders_1h": 3.0, "customer_zip_codes_7d": 2.0,
                                       "customer_seconds_since_last": 30.0,
                                       "sku_orders_10m": 4.0}
    assert scored.record["windowed_unknown"] == {} and scored.record["revision"] == 1


def test_a_join_of_one_store_waits_for_that_store_only_and_flags_what_it_lacks(
        windowed_model: Model, history: Path) -> None:
    """The join of the SKU store alone (as for a model reading only sku_orders_10m): orders
    wait for that store only. The model here reads the customer's features too, which no join
    gives: they are null and say not_joined, never a silent null."""
    core, join, _ = core_for(windowed_model, history, names=tuple(SKU))
    join.apply([sku_answer("o-1", 7.0)])
    (scored,) = core.process(order_items([order("o-1")])).predictions
    assert windowed(scored.record) == {**dict.fromkeys(CUSTOMER), "sku_orders_10m": 7.0}
    assert scored.record["windowed_unknown"] == dict.fromkeys(CUSTOMER, "not_joined")


def test_an_answer_without_a_value_of_a_feature_read_says_not_computed(
        windowed_model: Model, history: Path) -> None:
    """A stage whose TRIAGE_WINDOWED_FEATURES leaves a feature out answers without it."""
    core, join, _ = core_for(windowed_model, history)
    partial = answer("o-1", "customer_id", "C-1", {"customer_orders_1h": 1.0})
    join.apply([partial, sku_answer("o-1")])
    (scored,) = core.process(order_items([order("o-1")])).predictions
    assert scored.record["windowed_unknown"] == {"customer_zip_codes_7d": "not_computed",
                                                 "customer_seconds_since_last": "not_computed"}
    assert windowed(scored.record)["customer_orders_1h"] == 1.0


def test_past_the_max_wait_an_order_is_flagged_then_corrected_when_the_answer_comes(
        windowed_model: Model, history: Path) -> None:
    core, join, monotonic = core_for(windowed_model, history)
    join.apply([sku_answer("o-1")])
    core.process(order_items([order("o-1")]))
    monotonic.now += MAX_WAIT_S - 0.1
    assert core.process([]).predictions == []
    join.behind = True  # the answer may be on its way: the wait goes on
    monotonic.now += 0.2
    assert core.process([]).predictions == []
    join.behind = False
    outcome = core.process([])
    (scored,) = outcome.predictions
    assert outcome.windowed_expired == 1  # the worker's progress line and its warning count it
    assert windowed(scored.record) == {**dict.fromkeys(CUSTOMER), "sku_orders_10m": 4.0}
    assert scored.record["windowed_unknown"] == dict.fromkeys(CUSTOMER, "wait_expired")
    (fixed,) = core.correct_windowed(join.apply([customer_answer("o-1", 1.0)]))
    assert fixed.record["revision"] == 2
    assert fixed.record["revision_reason"] == "late_reference:windowed_features"
    assert windowed(fixed.record)["customer_orders_1h"] == 1.0
    assert fixed.record["windowed_unknown"] == {}
    assert core.correct_windowed(join.apply([customer_answer("o-1", 1.0)])) == []  # a replay


def test_an_answer_that_equals_the_null_published_still_clears_the_flag(
        windowed_model: Model, history: Path) -> None:
    """seconds_since_last is null for a first order: published null as unknown, the answer
    null as known. The values are equal; what the prediction says of them is not."""
    core, join, monotonic = core_for(windowed_model, history,
                                     names=("customer_seconds_since_last",))
    core.process(order_items([order("o-1")]))
    monotonic.now += MAX_WAIT_S
    (scored,) = core.process([]).predictions
    assert scored.record["windowed_unknown"] == {
        "customer_seconds_since_last": "wait_expired",
        **dict.fromkeys(("customer_orders_1h", "customer_zip_codes_7d", *SKU), "not_joined")}
    first = answer("o-1", "customer_id", "C-1", {"customer_orders_1h": 0.0,
                                                 "customer_zip_codes_7d": 1.0,
                                                 "customer_seconds_since_last": None})
    (fixed,) = core.correct_windowed(join.apply([first]))
    assert fixed.record["revision"] == 2
    assert "customer_seconds_since_last" not in fixed.record["windowed_unknown"]
    assert windowed(fixed.record)["customer_seconds_since_last"] is None


def test_a_later_revision_corrects_and_revision_zero_never_stands_above_another(
        windowed_model: Model, history: Path) -> None:
    core, join, _ = core_for(windowed_model, history)
    join.apply([customer_answer("o-1", 2.0), sku_answer("o-1")])
    (scored,) = core.process(order_items([order("o-1")])).predictions
    assert windowed(scored.record)["customer_orders_1h"] == 2.0
    assert core.correct_windowed(join.apply([customer_answer("o-1", 9.0, revision=0,
                                                             expired=True)])) == []
    assert core.correct_windowed(join.apply([customer_answer("o-1", 9.0, revision=1)])) == []
    (fixed,) = core.correct_windowed(join.apply([customer_answer("o-1", 3.0, revision=2)]))
    assert (fixed.record["revision"], windowed(fixed.record)["customer_orders_1h"]) == (2, 3.0)
    assert core.correct_windowed(join.apply([customer_answer("o-1", 2.0, revision=1)])) == []


def test_an_order_the_stage_could_not_know_says_window_expired(
        windowed_model: Model, history: Path) -> None:
    core, join, _ = core_for(windowed_model, history)
    join.apply([customer_answer("o-1", 0.0, revision=0, expired=True), sku_answer("o-1")])
    (scored,) = core.process(order_items([order("o-1")])).predictions
    assert windowed(scored.record) == {**dict.fromkeys(CUSTOMER), "sku_orders_10m": 4.0}
    assert scored.record["windowed_unknown"] == dict.fromkeys(CUSTOMER, "window_expired")


def test_read_back_predictions_keep_their_flags_and_an_answer_corrects_them(
        windowed_model: Model, history: Path) -> None:
    """After a restart the kept orders come from the predictions topic: a flag published
    there is what a later answer is compared with; no answer leaves what is out standing."""
    core, _, monotonic = core_for(windowed_model, history)
    core.process(order_items([order("o-1"), order("o-2", customer="C-2")]))
    monotonic.now += MAX_WAIT_S
    published = [p.record for p in core.process([]).predictions]
    assert all(p["windowed_unknown"] for p in published)
    again, join2, _ = core_for(windowed_model, history)
    again.read_back(kept_from_records(3, published, 0.0, T + 60_000))
    assert again.verify() == []  # no answers yet: what is out stands
    (fixed,) = again.correct_windowed(join2.apply([customer_answer("o-1", 5.0),
                                                   sku_answer("o-1")]))
    assert fixed.record["order_id"] == "o-1" and fixed.record["revision"] == 2
    assert windowed(fixed.record)["customer_orders_1h"] == 5.0
    assert fixed.record["windowed_unknown"] == {}


def test_answers_are_forgotten_behind_the_newest_order_scored() -> None:
    join = WindowedJoin(WINDOWED_NAMES, max_wait_s=1.0, retention_ms=60_000,
                        clock=lambda: T + 3_600_000)
    join.apply([sku_answer("old")])
    join.scored(np.array([T + 60_000]))
    assert join.expire() == 0
    join.scored(np.array([T + 60_001]))
    assert join.expire() == 1 and len(join) == 0


def test_before_any_order_is_scored_answers_are_kept_behind_the_newest_answer() -> None:
    join = WindowedJoin(WINDOWED_NAMES, max_wait_s=1.0, retention_ms=60_000,
                        clock=lambda: T + 3_600_000)
    join.apply([sku_answer("old"), answer("new", "sku_code", "S-1", {}, at=T + 60_001)])
    assert join.expire() == 1 and len(join) == 1


def test_an_order_stamped_far_ahead_does_not_expire_the_answers() -> None:
    """An order a day ahead of the clock moves the bound only to the clock plus the skew."""
    join = WindowedJoin(WINDOWED_NAMES, max_wait_s=1.0, retention_ms=60_000,
                        clock=lambda: T, skew_ms=1_000)
    join.apply([sku_answer("now")])
    join.scored(np.array([T + 86_400_000]))
    assert join.expire() == 0 and len(join) == 1


def test_a_reader_behind_holds_orders_for_a_bounded_number_of_max_waits() -> None:
    join = WindowedJoin(WINDOWED_NAMES, max_wait_s=1.0, retention_ms=60_000)
    join.behind = True
    waited = np.array([1.0, BEHIND_WAITS * 1.0 - 0.1, BEHIND_WAITS * 1.0])
    ready, expired = join.admit([order("a"), order("b"), order("c")], waited)
    assert ready.tolist() == [False] * 3 and expired.tolist() == [False, False, True]


def test_an_undeclared_feature_is_refused() -> None:
    with pytest.raises(ValueError, match="no such windowed feature"):
        WindowedJoin(["orders_per_moon"], max_wait_s=1.0, retention_ms=1)


def test_a_forgotten_order_answered_window_expired_later_keeps_what_was_published(
        windowed_model: Model, history: Path) -> None:
    """The scorer forgot the answer it scored with; a redelivered record then comes back
    from the stage as revision 0, window_expired. What was published was known: it stands."""
    core, join, _ = core_for(windowed_model, history)
    join.apply([customer_answer("o-1", 2.0), sku_answer("o-1")])
    (scored,) = core.process(order_items([order("o-1")])).predictions
    assert windowed(scored.record)["customer_orders_1h"] == 2.0
    join.answers.clear()
    changed = join.apply([customer_answer("o-1", 0.0, revision=0, expired=True)])
    assert changed == ["o-1"] and core.correct_windowed(changed) == []
