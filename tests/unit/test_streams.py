"""Reference streams as declarations (model/streams.py): a stream declared here, in the test, and
nowhere else, is loaded from its snapshot CSV, applied from its events, joined as of each
order's time (pandas.merge_asof is the oracle), holds orders back until it has passed their
time, finds the orders its late events touch, and has its topic setting, its topic's partition
count, its settings row and its replay records; no other code names it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from triage.bus.settings import SettingsError
from triage.consumer.settings import WorkerSettings
from triage.model.features import FeatureBatch
from triage.model.reference import ReferenceTables
from triage.model.streams import (
    REFERENCE_STREAMS,
    ReferenceStream,
    reference_topic_partitions,
)
from triage.producer.replay import reference_records
from triage.scoring.corrections import Kept, RetainedOrders
from triage.scoring.feed import LateEvent, ReferenceFeed, ReferenceReader
from triage.scoring.settings import ReferenceSettings, ValidationSettings
from triage.scoring.validation import OrderValidator
from triage.settings import Settings, settings_rows

# The toy stream: a loyalty tier per customer, joined on the order's customer_id.
LOYALTY = ReferenceStream(
    "loyalty", schema="loyalty", key="customer_id", order_key="customer_id",
    time="timestamp_ms", value="tier", kind="number", csv_file="loyalty.csv",
    csv_time="timestamp", description="loyalty tiers, keyed by customer_id.")
STREAMS = (*REFERENCE_STREAMS, LOYALTY)
T = 1_767_607_200_000  # 2026-01-05 10:00:00 UTC, in ms


def toy_feed(now_ms: int, *, snapshot: bool = False,
             tables: ReferenceTables | None = None) -> ReferenceFeed:
    feed = ReferenceFeed(tables or ReferenceTables.empty(STREAMS),
                         ReferenceSettings(reference_lateness_ms=1_000,
                                           reference_max_wait_ms=60_000),
                         OrderValidator(ValidationSettings()), snapshot=snapshot,
                         clock=lambda: now_ms)
    for stream in STREAMS:
        feed.assign(stream.name, [0], count=1)
    return feed


def oracle(events: pd.DataFrame, customers: list[str], times_ms: list[int]) -> list[float]:
    """pandas.merge_asof of the orders with the events, by customer, backward in time."""
    orders = pd.DataFrame({"customer_id": customers, "t": times_ms, "row": range(len(customers))})
    joined = pd.merge_asof(orders.sort_values("t"),
                           events.rename(columns={"timestamp_ms": "t"}).sort_values("t",
                                                                                    kind="stable"),
                           on="t", by="customer_id", direction="backward")
    return joined.sort_values("row")["tier"].tolist()


def test_a_declared_stream_is_applied_and_joined_as_merge_asof_has_it() -> None:
    rng = np.random.default_rng(7)
    customers = [f"c{i}" for i in range(8)]
    events = pd.DataFrame({
        "customer_id": rng.choice(customers, 200),
        "timestamp_ms": T + rng.integers(0, 60_000, 200),
        "tier": rng.integers(0, 4, 200).astype(float)})
    feed = toy_feed(T + 120_000)
    records = events.to_dict("records")
    applied = feed.apply("loyalty", 0, records, list(range(len(records))))
    assert applied.applied == len(records) and not applied.rejected

    asked = list(rng.choice(customers, 300))
    at = (T - 1_000 + rng.integers(0, 62_000, 300)).tolist()
    got = feed.tables.as_of("loyalty", asked, np.array(at, dtype=np.int64))
    want = oracle(events, asked, at)
    np.testing.assert_array_equal(got, np.array(want, dtype=np.float64))


def test_a_declared_stream_holds_an_order_back_until_it_has_passed_the_order() -> None:
    feed = toy_feed(T + 100)  # the wall clock 100 ms after the order: no allowance run out
    for stream in REFERENCE_STREAMS:  # every other stream is well past the order
        feed.note_position(stream.name, 0, 0, 0)
        feed.progress[(stream.name, 0)].max_event_ms = T + 10_000
    order = np.array([T], dtype=np.int64)
    feed.note_position("loyalty", 0, 0, 5)  # records to come on the toy stream's partition
    ready, _ = feed.admit(order, order, np.zeros(1))
    assert not ready[0]
    feed.apply("loyalty", 0, [{"customer_id": "c1", "timestamp_ms": T + 1, "tier": 2.0}], [4])
    ready, _ = feed.admit(order, order, np.zeros(1))
    assert ready[0]


def test_a_declared_streams_bad_records_are_refused_by_its_declaration() -> None:
    feed = toy_feed(T)
    applied = feed.apply("loyalty", 0, [
        {"customer_id": "c1", "timestamp_ms": T, "tier": float("nan")},
        {"customer_id": "", "timestamp_ms": T, "tier": 1.0},
        {"customer_id": "c2", "timestamp_ms": T + 86_400_001, "tier": 1.0},  # over a day ahead
    ], [0, 1, 2])
    assert applied.applied == 0
    assert [reason for _, reason, _ in applied.rejected] == [
        "invalid_field", "missing_field", "invalid_timestamp"]


def test_a_late_event_of_a_declared_stream_finds_the_orders_it_touches() -> None:
    retained = RetainedOrders(3_600_000, STREAMS)
    features = FeatureBatch.from_values({"order_hour_of_day": [10, 10],
                                         "inventory": [1.0, 1.0],
                                         "payment_status": ["OK", "OK"],
                                         "zip_code_available": [True, True]})
    kept = Kept(partition=0, order_id=["o1", "o2"], customer_id=["c1", "c2"],
                sku_code=["s", "s"], zip_code=["z", "z"],
                timestamp_ms=np.array([T, T], dtype=np.int64),
                offset=np.array([0, 1], dtype=np.int64),
                published_ms=np.array([T, T], dtype=np.int64),
                expired=np.zeros(2, dtype=bool), revision=np.ones(2, dtype=np.int32),
                recommendation=np.array(["Deliver", "Deliver"], dtype=object),
                features=features, scored_at_ms=T, verified=np.ones(2, dtype=bool),
                alive=np.ones(2, dtype=bool))
    retained.add(kept)
    found = retained.affected([LateEvent("loyalty", "c2", T - 5)])
    assert [(k.order_id, rows.tolist()) for k, rows in found] == [(["o1", "o2"], [1])]


def test_a_declared_stream_loads_from_its_snapshot_csv(tmp_path: Path) -> None:
    for stream in REFERENCE_STREAMS:  # the others' files, empty
        (tmp_path / stream.csv_file).write_text(",".join(stream.csv_columns) + "\n")
    (tmp_path / "loyalty.csv").write_text(
        "customer_id,timestamp,tier\nc1,2026-01-05 10:00:00,1\nc1,2026-01-05 10:00:05,3\n")
    tables = ReferenceTables.load(tmp_path, streams=STREAMS)
    at = np.array([T - 1, T, T + 4_999, T + 5_000], dtype=np.int64)
    np.testing.assert_array_equal(tables.as_of("loyalty", ["c1"] * 4, at),
                                  [np.nan, 1.0, 1.0, 3.0])


def test_a_declared_stream_has_its_topic_setting_partitions_and_docs_row() -> None:
    # A worker's settings (the command line's Settings knows only the streams declared in
    # model/streams.py, and refuses others: the next test).
    settings = WorkerSettings.from_env({"TRIAGE_LOYALTY_TOPIC": "crm.loyalty"})
    assert settings.topics.topic_of("loyalty") == "crm.loyalty"
    assert settings.to_env()["TRIAGE_LOYALTY_TOPIC"] == "crm.loyalty"
    assert WorkerSettings.of(loyalty_topic="x").topics.topic_of("loyalty") == "x"
    assert Settings().topics.topic_of("loyalty") == "loyalty"  # the default: its name
    partitions = reference_topic_partitions(settings.topics, STREAMS)
    assert partitions["crm.loyalty"] == settings.topics.reference_partitions  # global
    assert "TRIAGE_LOYALTY_TOPIC" in [row[0] for row in settings_rows(STREAMS)]
    assert "TRIAGE_LOYALTY_TOPIC" not in [row[0] for row in settings_rows()]


def test_a_declared_stream_replays_from_its_csv_columns() -> None:
    frame = pd.DataFrame({"customer_id": ["c1", "c2"],
                          "timestamp": ["2026-01-05 10:00:00", "2026-01-05 10:00:01"],
                          "tier": ["1", "2.5"]})
    records, times = reference_records(frame, LOYALTY, "loyalty.csv")
    assert records == [{"customer_id": "c1", "timestamp_ms": T, "tier": 1.0},
                       {"customer_id": "c2", "timestamp_ms": T + 1_000, "tier": 2.5}]
    assert times.tolist() == [T, T + 1_000]


def test_a_topic_setting_of_a_stream_nobody_declared_is_refused() -> None:
    """TRIAGE_PAYMENT_TOPIC (singular) is a misspelling, not a new stream: refused by every
    command (the command line's settings) and by a worker's reference reader."""
    with pytest.raises(SettingsError, match="TRIAGE_PAYMENT_TOPIC names no reference stream"):
        Settings.from_env({"TRIAGE_PAYMENT_TOPIC": "pay"})
    with pytest.raises(SettingsError, match="TRIAGE_PAYMNTS_TOPIC names no reference stream"):
        Settings.of(paymnts_topic="pay")
    worker = WorkerSettings.from_env({"TRIAGE_PAYMENT_TOPIC": "pay"})
    with pytest.raises(SettingsError, match="TRIAGE_PAYMENT_TOPIC names no reference stream"):
        ReferenceReader(worker.connection, worker.topics, toy_feed(T))
