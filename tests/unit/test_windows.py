"""Windowed features (model/windows.py): the offline computation (pandas, a whole history) and
the online state (one order at a time, in any arrival order, with expiry) both equal a
brute-force reading of the window rule, written here from the module docstring: ties at one
millisecond, the half-open window, an order that counts once, empty entities."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triage.model.datagen import generate
from triage.model.orders import read_orders_csv
from triage.model.windows import (
    TIE_BREAK,
    WINDOWED_FEATURES,
    Expired,
    WindowedFeature,
    WindowState,
    declared,
    offline_values,
    online_values,
    rank_of,
)

EXAMPLES = settings(max_examples=200, deadline=None)


def oracle(records: list[dict[str, Any]], feature: WindowedFeature) -> list[Any]:
    """The rule, read literally: the standing record of each (order_id, entity value) is its
    earliest, on a tie the one of smallest (customer_id, sku_code, zip_code); an order sees its
    entity's standing orders before it in (time, id) order, those after T - window in the
    window."""
    def rank(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["timestamp_ms"], r["customer_id"], r["sku_code"], r["zip_code"])

    standing: dict[tuple[str, str], tuple[Any, Any, dict[str, Any]]] = {}
    for r in records:
        key = (r["order_id"], r[feature.entity])
        if key not in standing or rank(r) < standing[key][0]:
            standing[key] = (rank(r), None, r)
    out = []
    for r in records:
        own = standing[(r["order_id"], r[feature.entity])][2]
        t, entity = own["timestamp_ms"], own[feature.entity]
        if entity == "":
            out.append(0 if feature.aggregation != "seconds_since_last" else None)
            continue
        earlier = [e for _, _, e in standing.values() if e[feature.entity] == entity
                   and (e["timestamp_ms"], e["order_id"]) < (t, own["order_id"])]
        window = [e for e in earlier if e["timestamp_ms"] > t - feature.window_ms]
        if feature.aggregation == "count":
            out.append(len(window) + (1 if feature.include_self else 0))
        elif feature.aggregation == "distinct_count":
            assert feature.of is not None
            seen = {e[feature.of] for e in window}
            if feature.include_self:
                seen.add(own[feature.of])
            out.append(len(seen))
        else:
            last = max(earlier, key=lambda e: (e["timestamp_ms"], e["order_id"]), default=None)
            out.append((t - last["timestamp_ms"]) / 1000.0
                       if last is not None and last["timestamp_ms"] > t - feature.window_ms
                       else None)
    return out


@st.composite
def features(draw: st.DrawFn, entity: str | None = None, name: str = "f") -> WindowedFeature:
    aggregation = draw(st.sampled_from(["count", "distinct_count", "seconds_since_last"]))
    return WindowedFeature(
        name=name, entity=entity or draw(st.sampled_from(["customer_id", "sku_code",
                                                          "zip_code"])),
        aggregation=aggregation, window_ms=draw(st.integers(1, 40)),
        of=draw(st.sampled_from(["zip_code", "sku_code", "order_id"]))
        if aggregation == "distinct_count" else None,
        include_self=aggregation != "seconds_since_last" and draw(st.booleans()))


@st.composite
def store_features(draw: st.DrawFn) -> list[WindowedFeature]:
    """One to three features of one entity: what one state (a store) computes together."""
    entity = draw(st.sampled_from(["customer_id", "sku_code", "zip_code"]))
    return [draw(features(entity, f"f{i}")) for i in range(draw(st.integers(1, 3)))]


@st.composite
def histories(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Orders in bursts at few milliseconds (ties), few entities (an empty one among them),
    and records repeated: unchanged (a redelivery) or at another time and entity."""
    size = draw(st.integers(0, 40))
    ids = [f"O-{i}" for i in range(draw(st.integers(1, 30)))]
    records = []
    for _ in range(size):
        records.append({"order_id": draw(st.sampled_from(ids)),
                        "customer_id": draw(st.sampled_from(["C-1", "C-2", "C-3", ""])),
                        "sku_code": draw(st.sampled_from(["S-1", "S-2"])),
                        "zip_code": draw(st.sampled_from(["10001", "10002", "10003", ""])),
                        "timestamp_ms": draw(st.integers(0, 60))})
        if records and draw(st.integers(0, 4)) == 0:
            records.append(dict(draw(st.sampled_from(records))))  # a redelivery
        if records and draw(st.integers(0, 5)) == 0:  # the same order, time and entity,
            other = dict(draw(st.sampled_from(records)))  # another field changed
            field = draw(st.sampled_from(["customer_id", "sku_code", "zip_code"]))
            other[field] = draw(st.sampled_from(["C-0", "S-0", "10000", "S-9", "C-9"]))
            records.append(other)
    return records


def frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(records, columns=["order_id", "customer_id", "sku_code", "zip_code",
                                          "timestamp_ms"])


@EXAMPLES
@given(records=histories(), feature=features(), seed=st.integers(0, 2**32 - 1))
def test_offline_and_online_in_any_arrival_order_equal_the_rule(
        records: list[dict[str, Any]], feature: WindowedFeature, seed: int) -> None:
    expected = oracle(records, feature)
    assert offline_values(frame(records), feature) == expected
    arrived = records[:]
    random.Random(seed).shuffle(arrived)
    state = WindowState(feature)
    for record in arrived:
        state.add(record)
    assert [state.value(r) for r in records] == expected
    assert online_values(records, feature) == expected


def standing_times(records: list[dict[str, Any]], entity: str) -> dict[tuple[str, str], int]:
    """(order_id, entity value) -> the time of the record that stands (the earliest)."""
    times: dict[tuple[str, str], int] = {}
    for r in records:
        key = (r["order_id"], r[entity])
        times[key] = min(times.get(key, r["timestamp_ms"]), r["timestamp_ms"])
    return times


@EXAMPLES
@given(records=histories(), feats=store_features(), seed=st.integers(0, 2**32 - 1))
def test_online_values_asked_when_the_watermark_passes_them_with_expiry_equal_the_rule(
        records: list[dict[str, Any]], feats: list[WindowedFeature], seed: int) -> None:
    """Records arrive out of order (each up to 15 ms late); a record is asked for once every
    record at or before its time has arrived (the scorer's watermark), and the state forgets
    what no record still to come can see. Every answer is the rule's, for every feature of
    the state (one to three of one entity, windows of any lengths: a store); a record whose
    order stands before the horizon by then is refused (Expired), not answered. (Every record
    of an order comes within the state's dedup_ms of it here: see the test after this one.)"""
    dedup_ms = 200  # beyond the histories' 75 ms
    entity = feats[0].entity
    expected = dict(zip(map(id, records), zip(*(oracle(records, f) for f in feats),
                                              strict=True), strict=True))
    stands = standing_times(records, entity)
    rng = random.Random(seed)
    arrival = sorted(records, key=lambda r: r["timestamp_ms"] + rng.randint(0, 15))
    state = WindowState(feats, dedup_ms=dedup_ms)
    answered = refused = 0
    waiting: list[dict[str, Any]] = []
    for i, record in enumerate(arrival):
        state.add(record)
        waiting.append(record)
        to_come = min((r["timestamp_ms"] for r in arrival[i + 1:]), default=None)
        ready = [r for r in waiting if to_come is None or r["timestamp_ms"] < to_come]
        for r in ready:
            if r[entity] and stands[r["order_id"], r[entity]] < state.horizon:
                with pytest.raises(Expired):
                    state.values(r)
                refused += 1
            else:
                assert state.values(r) == expected[id(r)], r
                answered += 1
        waiting = [r for r in waiting if not any(r is q for q in ready)]
        horizon = min([r["timestamp_ms"] for r in waiting] + ([to_come] if to_come is not None
                                                              else []), default=None)
        if horizon is not None:
            state.expire(horizon)
            cutoff = state.horizon - max(f.window_ms for f in feats)  # nothing at or before
            assert all(t > cutoff for entries in state.entities.values() for t, _, _ in entries)
            assert all(latest > cutoff - dedup_ms for *_, latest in state.standing.values())
    assert answered + refused == len(records)
    # A record whose order stands at its own time is never refused: only later records of
    # an order (a redelivery at another time) can be.
    assert refused <= sum(r["timestamp_ms"] > stands[r["order_id"], r[entity]]
                          for r in records)


def test_a_record_of_an_order_later_than_the_dedup_horizon_counts_as_a_new_order() -> None:
    """The state knows an order's standing record for dedup_ms past its window (the scorer
    will set it to what it keeps of published orders): a redelivery within that is the same
    order; one later than that, at a time at or after the horizon, is a new order."""
    feature = WindowedFeature("orders_10ms", "customer_id", "count", 10)
    first = {"order_id": "A", "customer_id": "C", "sku_code": "S", "zip_code": "1",
             "timestamp_ms": 100}
    again = {**first, "timestamp_ms": 130}
    other = {**first, "order_id": "B", "timestamp_ms": 135}
    for dedup_ms, known in ((50, True), (5, False)):
        state = WindowState(feature, dedup_ms=dedup_ms)
        state.add(first)
        state.expire(125)  # forgets A's window entry (at or before 115)
        assert state.add(again) is (not known)
        state.add(other)
        if known:
            with pytest.raises(Expired):
                state.value(again)  # A stands at 100, before the horizon
            assert state.value(other) == 0
        else:
            assert state.value(again) == 0 and state.value(other) == 1


def test_the_rule_at_its_edges() -> None:
    """Ties at one millisecond by order_id; an order exactly window_ms earlier is out; an
    earlier record of an order replaces a later one; an empty entity gets the missing value."""
    orders = [{"order_id": "B", "customer_id": "C", "sku_code": "S", "zip_code": "1",
               "timestamp_ms": 1000},
              {"order_id": "A", "customer_id": "C", "sku_code": "S", "zip_code": "2",
               "timestamp_ms": 1000},
              {"order_id": "D", "customer_id": "C", "sku_code": "S", "zip_code": "2",
               "timestamp_ms": 1600},
              {"order_id": "E", "customer_id": "", "sku_code": "S", "zip_code": "3",
               "timestamp_ms": 1700}]
    count = WindowedFeature("orders_600ms", "customer_id", "count", 600)
    # A comes before B at the same millisecond; for D, A and B (600 ms before it) are out.
    assert offline_values(frame(orders), count) == [1, 0, 0, 0]
    assert online_values(orders, count) == [1, 0, 0, 0]
    since = WindowedFeature("since_last", "customer_id", "seconds_since_last", 601)
    assert offline_values(frame(orders), since) == [0.0, None, 0.6, None]
    zips = WindowedFeature("zips", "customer_id", "distinct_count", 10_000, of="zip_code",
                           include_self=True)
    assert online_values(orders, zips) == [2, 1, 2, 0]
    again = [*orders, {**orders[2], "timestamp_ms": 900}]  # D again, earlier: it stands there
    assert offline_values(frame(again), count) == [2, 1, 0, 0, 0]
    assert online_values(again, count) == [2, 1, 0, 0, 0]


@pytest.mark.parametrize(("arguments", "message"), [
    ({"aggregation": "sum"}, "is not one of"),
    ({"entity": "order_id"}, "is not an order field"),
    ({"window_ms": 0}, "positive int"),
    ({"window_ms": 2**63}, "positive int"),
    ({"window_ms": True}, "positive int"),
    ({"aggregation": "distinct_count"}, "'of' names"),
    ({"of": "zip_code"}, "'of' names"),
    ({"aggregation": "seconds_since_last", "include_self": True}, "never includes"),
])
def test_a_declaration_that_breaks_the_rules_is_refused(arguments: dict[str, Any],
                                                        message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WindowedFeature(**{"name": "f", "entity": "customer_id", "aggregation": "count",
                           "window_ms": 1000, **arguments})


def test_the_declared_features_compute_offline_as_online_on_generated_orders(
        tmp_path: Path) -> None:
    """The declarations of WINDOWED_FEATURES over a week of generated orders (the data
    generator's, with their real bursts and ties): offline equals online for every order."""
    generate(2_000, 7, tmp_path, weeks=1)
    orders = read_orders_csv(tmp_path / "orders.csv")
    records = orders.records()
    table = frame(records)
    assert set(declared(WINDOWED_FEATURES)) == {f.name for f in WINDOWED_FEATURES}
    for feature in WINDOWED_FEATURES:
        offline = offline_values(table, feature)
        assert offline == online_values(records, feature), feature.name
        assert any(v not in (0, None) for v in offline), feature.name  # the data exercise it


def test_records_of_one_order_stand_per_entity_value_and_nulls_read_as_empty() -> None:
    """Two records of one order at one time: for the customer they share, the one of smallest
    (customer_id, sku_code, zip_code) stands (one order, its zip counted); for the two SKUs
    they name, each is an order of its SKU (a repartition by SKU cannot see across SKUs). A
    None entity or counted value is the empty string, offline and online."""
    a1 = {"order_id": "A", "customer_id": "C1", "sku_code": "S2", "zip_code": "9",
          "timestamp_ms": 5}
    a2 = {**a1, "sku_code": "S1", "zip_code": "8"}
    b = {"order_id": "B", "customer_id": "C1", "sku_code": "S2", "zip_code": "2",
         "timestamp_ms": 6}
    by_customer = WindowedFeature("c", "customer_id", "count", 100)
    zips = WindowedFeature("z", "customer_id", "distinct_count", 100, of="zip_code",
                           include_self=True)
    by_sku = WindowedFeature("s", "sku_code", "count", 100)
    for records in ([a1, a2, b], [a2, a1, b]):
        for compute in (lambda f, r=records: offline_values(frame(r), f),
                        lambda f, r=records: online_values(r, f)):
            assert compute(by_customer)[2] == 1  # A once, not twice
            assert compute(zips)[2] == 2  # a2 stands (S1 < S2): zips 8 and 2, not 9
            assert compute(by_sku)[2] == 1  # S2 saw a1
            assert compute(by_sku)[:2] == [0, 0]
    nulls = [{**a1, "zip_code": None}, {**b, "order_id": "X", "zip_code": ""},
             {**b, "customer_id": None}]
    zips = WindowedFeature("z", "customer_id", "distinct_count", 100, of="zip_code",
                           include_self=True)
    assert offline_values(frame(nulls), zips) == online_values(nulls, zips) == [1, 1, 0]


def test_expiry_frees_the_windows_and_the_orders() -> None:
    feature = WindowedFeature("orders_10ms", "customer_id", "count", 10)
    state = WindowState(feature, dedup_ms=5)
    for i in range(1000):
        state.add({"order_id": f"O-{i}", "customer_id": f"C-{i % 7}", "sku_code": "S",
                   "zip_code": "1", "timestamp_ms": i})
    assert state.expire(500) == 491  # times 0 to 490 left the windows
    assert sum(len(e) for e in state.entities.values()) == 1000 - 491
    assert len(state) == 1000 - 486  # and which record stands, for times 0 to 485


def test_a_name_declared_twice_is_refused() -> None:
    feature = WindowedFeature("f", "customer_id", "count", 1000)
    with pytest.raises(ValueError, match="declared twice"):
        declared([feature, feature])


@EXAMPLES
@given(records=histories(), feats=store_features(), horizon=st.integers(0, 80))
def test_a_state_loaded_in_bulk_answers_as_the_one_built_record_by_record(
        records: list[dict[str, Any]], feats: list[WindowedFeature], horizon: int) -> None:
    """load() (a restore) from each order's standing record and latest time gives the state
    that add() of every record gave: the same values, and after an expiry the same orders
    forgotten, the same records refused as already counted."""
    built = WindowState(feats, dedup_ms=10)
    for record in records:
        built.add(record)
    loaded = WindowState(feats, dedup_ms=10)
    assert loaded.load((dict(zip(("timestamp_ms", *TIE_BREAK), rank, strict=True))
                        | {"order_id": order_id}, rank, latest)
                       for (order_id, _), (rank, _, latest) in built.standing.items()
                       ) == len(built)
    assert loaded.standing == built.standing and loaded.entities == built.entities
    for state in (built, loaded):
        state.expire(horizon)
    assert loaded.standing == built.standing and loaded.entities == built.entities
    for record in records:
        assert loaded.add(record) == built.add(record)
        try:
            expected: Any = built.values(record)
        except Expired:
            with pytest.raises(Expired):
                loaded.values(record)
        else:
            assert loaded.values(record) == expected


def test_a_state_refuses_features_of_two_entities_a_second_load_and_value_of_several() -> None:
    count = WindowedFeature("c", "customer_id", "count", 100)
    with pytest.raises(ValueError, match="one entity"):
        WindowState([count, WindowedFeature("s", "sku_code", "count", 100)])
    with pytest.raises(ValueError, match="one entity"):
        WindowState([])
    order = {"order_id": "A", "customer_id": "C", "sku_code": "S", "zip_code": "1",
             "timestamp_ms": 5}
    state = WindowState([count, WindowedFeature("l", "customer_id", "seconds_since_last", 9)])
    with pytest.raises(ValueError, match="twice"):
        state.load([(order, rank_of(order), 5), (order, rank_of(order), 7)])
    with pytest.raises(ValueError, match="new state"):
        state.load([])
    with pytest.raises(ValueError, match="use values"):
        state.value(order)
    assert state.values(order) == (0, None)
