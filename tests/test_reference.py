"""The live reference join without a broker: the event-time rule (when an order may be scored),
the tables it keeps, late and bad reference records, and orders waiting in the scoring core."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_core import CODEC, kafka
from triage.bus.settings import ReferenceSettings, ValidationSettings
from triage.consumer.core import CoreConfig, ScoringCore
from triage.consumer.reference import INVENTORY, PAYMENTS, ZIP_CODES, ReferenceFeed
from triage.consumer.validation import OrderValidator
from triage.model import artifact
from triage.model.reference import ReferenceTables, event_seconds

T = 1_767_607_200_000  # 2026-01-05 10:00:00 UTC, in ms
IDLE_S, MAX_WAIT_S = 0.2, 5.0


def feed(*, snapshot: bool = False, tables: ReferenceTables | None = None) -> ReferenceFeed:
    settings = ReferenceSettings(reference_idle_ms=int(IDLE_S * 1000),
                                 reference_max_wait_ms=int(MAX_WAIT_S * 1000))
    made = ReferenceFeed(tables or ReferenceTables.empty(), settings,
                         OrderValidator(ValidationSettings()), snapshot=snapshot)
    made.assign(INVENTORY, [0, 1])
    made.assign(ZIP_CODES, [0])
    made.assign(PAYMENTS, [3])
    return made


def stock(sku: str, ms: int, level: float) -> dict:
    return {"sku_code": sku, "timestamp_ms": ms, "inventory": level}


def paid(order: str, ms: int, status: str = "OK") -> dict:
    return {"order_id": order, "timestamp_ms": ms, "payment_status": status}


def zipped(code: str, ms: int) -> dict:
    return {"zip_code": code, "available_from_ms": ms}


def admit(f: ReferenceFeed, order_ms: int, now: float, partition: int = 3,
          waited: float = 0.0) -> tuple[bool, bool]:
    ready, expired = f.admit(np.array([partition]), np.array([order_ms]), np.array([waited]),
                             now)
    return bool(ready[0]), bool(expired[0])


def test_an_order_waits_until_every_stream_it_reads_has_passed_its_second() -> None:
    f = feed()
    order = T + 300  # 10:00:00.300 needs events up to 10:00:00.000
    assert admit(f, order, now=0.0) == (False, False)  # no stream has had a record
    f.apply(INVENTORY, 0, [stock("A", T + 1, 5)], [0], now=0.0)
    f.apply(INVENTORY, 1, [stock("B", T + 900, 5)], [0], now=0.0)
    f.apply(ZIP_CODES, 0, [zipped("1", T + 5)], [0], now=0.0)
    assert admit(f, order, now=0.0) == (False, False)  # payments partition 3: nothing yet
    f.apply(PAYMENTS, 3, [paid("o", T + 1)], [0], now=0.0)
    assert admit(f, order, now=0.0) == (True, False)
    # An order of another second waits for events past that second, on every partition.
    assert admit(f, T + 1000, now=0.0) == (False, False)
    # The max wait lets it go, flagged.
    assert admit(f, T + 1000, now=0.0, waited=MAX_WAIT_S) == (False, True)


def test_a_partition_idle_at_its_high_watermark_has_passed_every_time() -> None:
    f = feed()
    for stream, partitions in ((INVENTORY, (0, 1)), (ZIP_CODES, (0,)), (PAYMENTS, (3,))):
        f.apply(stream, partitions[0], [stock("A", T - 60_000, 1) if stream == INVENTORY
                                        else paid("o", T - 60_000) if stream == PAYMENTS
                                        else zipped("1", T - 60_000)], [0], now=0.0)
        for p in partitions:
            f.note_position(stream, p, 0, 1 if p == partitions[0] else 0, now=0.0)
    patient = IDLE_S + 0.01
    assert admit(f, T, now=0.1, waited=patient) == (False, False)  # not idle long enough yet
    assert admit(f, T, now=patient, waited=patient) == (True, False)  # idle: passed everything
    # ...but only for an order that has itself waited the idle time: an event published just
    # before it may still be in flight.
    assert admit(f, T, now=patient, waited=0.0) == (False, False)
    f.apply(INVENTORY, 0, [stock("A", T - 1, 2)], [1], now=1.0)  # news: not idle any more
    f.note_position(INVENTORY, 0, 0, 3, now=1.0)              # and behind its high mark
    assert admit(f, T, now=1.0 + IDLE_S, waited=patient) == (False, False)


def test_with_a_snapshot_a_stream_without_records_holds_no_news() -> None:
    f = feed(snapshot=True)
    for stream, partitions in ((INVENTORY, (0, 1)), (ZIP_CODES, (0,)), (PAYMENTS, (3,))):
        for p in partitions:
            f.note_position(stream, p, 0, 0, now=0.0)
    assert admit(f, T, now=0.0) == (True, False)  # at once: no news can be in flight
    assert not feed().passed(INVENTORY, 0, now=100.0, waited_s=100.0) > T  # without: nothing


def test_events_apply_from_the_first_whole_second_at_or_after_them() -> None:
    assert event_seconds(np.array([T, T + 1, T + 999, T + 1000])).tolist() == [
        T // 1000, T // 1000 + 1, T // 1000 + 1, T // 1000 + 1]
    f = feed()
    f.apply(INVENTORY, 0, [stock("A", T, 5), stock("A", T + 500, 7)], [0, 1], now=0.0)
    levels = f.tables.stock(["A", "A", "A"], np.array([T // 1000 - 1, T // 1000,
                                                       T // 1000 + 1]))
    assert np.isnan(levels[0]) and levels[1:].tolist() == [5.0, 7.0]


def test_late_and_bad_reference_records() -> None:
    f = feed()
    f.scored(np.array([3]), np.array([T + 2_500]))  # an order at 10:00:02 was scored
    applied = f.apply(INVENTORY, 0, [stock("A", T + 2_000, 1), stock("A", T + 2_001, 1)],
                      [0, 1], now=0.0)
    assert (applied.applied, applied.late) == (2, 1)  # 10:00:02.000 applied to that order
    future = int(time.time() * 1000) + 10 * 86_400_000
    bad = f.apply(PAYMENTS, 3, [paid("", T), paid("o", future, "OK"), None,
                                paid("p", T, " OK")], [0, 1, 2, 3], now=0.0,
                  rejected=[(2, "invalid_avro", "cut short")])
    assert bad.applied == 0 and sorted(r[1] for r in bad.rejected) == [
        "invalid_avro", "invalid_field", "invalid_timestamp", "missing_field"]
    assert f.passed(PAYMENTS, 3, now=0.0) < T  # bad records do not move the stream's time
    nan = f.apply(INVENTORY, 1, [stock("B", T, float("nan"))], [0], now=0.0)
    assert nan.rejected[0][1] == "invalid_field"


def test_revoking_a_partition_drops_its_payments() -> None:
    f = feed()
    f.apply(PAYMENTS, 3, [paid("o", T)], [0], now=0.0)
    assert f.tables.payment_status(["o"], np.array([T // 1000]), np.array([3])) == ["OK"]
    f.revoke_payments([3])
    assert f.tables.payment_status(["o"], np.array([T // 1000]), np.array([3])) == ["MISSING"]
    assert PAYMENTS not in {s for s, _ in f.progress}


def test_the_core_holds_orders_until_the_streams_pass_them_then_scores_them_exactly(
        history: Path, model_dir: Path) -> None:
    """Orders consumed before their reference data wait, uncommitted; once the streams pass
    their seconds they are scored with the features the complete history gives."""
    from triage.model.orders import read_orders_csv

    orders = read_orders_csv(history / "orders.csv", limit=50)
    complete = ReferenceTables.load(history)
    f = feed()
    core = ScoringCore(artifact.load(model_dir), f.tables, CODEC, config=CoreConfig(), gate=f)
    batch = kafka([CODEC.encode(r) for r in orders.records()])
    batch = [type(i)(i.value, i.key, type(i.source)(i.source.topic, 3, i.source.offset,
                                                     i.source.timestamp_ms)) for i in batch]
    first = core.process(batch)
    assert not first.predictions and len(first.deferred) == 50
    assert core.waiting_offsets() == {("orders", 3): 0}
    # The reference history arrives, every stream past the last order.
    import pandas as pd

    def rows(name: str) -> pd.DataFrame:
        return pd.read_csv(history / name, dtype=str, keep_default_na=False)

    def ms(column: pd.Series) -> list[int]:
        return pd.to_datetime(column).dt.as_unit("ms").astype("int64").tolist()

    inv = rows("inventory.csv")
    f.apply(INVENTORY, 0, [stock(k, t, float(v)) for k, t, v in zip(
        inv["sku_code"], ms(inv["timestamp"]), inv["inventory"], strict=True)],
        list(range(len(inv))), now=0.0)
    pay = rows("payments.csv")
    f.apply(PAYMENTS, 3, [paid(k, t, v) for k, t, v in zip(
        pay["order_id"], ms(pay["timestamp"]), pay["payment_status"], strict=True)],
        list(range(len(pay))), now=0.0)
    zips = rows("zip_codes.csv")
    f.apply(ZIP_CODES, 0, [zipped(k, t) for k, t in zip(
        zips["zip_code"], ms(zips["available_from"]), strict=True)],
        list(range(len(zips))), now=0.0)
    end = int(orders.timestamp_ms.max()) + 10**9
    f.apply(INVENTORY, 1, [stock("late-sku", end, 1)], [0], now=0.0)
    f.apply(INVENTORY, 0, [stock("late-sku", end, 1)], [len(inv)], now=0.0)
    f.apply(ZIP_CODES, 0, [zipped("late-zip", end)], [len(zips)], now=0.0)
    f.apply(PAYMENTS, 3, [paid("late-order", end)], [len(pay)], now=0.0)
    second = core.process([])
    assert len(second.predictions) == 50 and not core.waiting
    expected = orders.features(complete).records()
    got = {p.record["order_id"]: p.record["features"] for p in second.predictions}
    assert [got[o] for o in orders.order_id] == expected
    assert not any(p.record["reference_wait_expired"] for p in second.predictions)


@pytest.mark.parametrize("retention", ["", "90m", "30d", "3600"])
def test_retention_settings_parse(retention: str) -> None:
    seconds = ReferenceSettings(reference_retention=retention).retention_s
    assert seconds == {"": None, "90m": 5400, "30d": 2_592_000, "3600": 3600}[retention]


def test_the_max_wait_does_not_expire_an_order_whose_events_are_still_to_be_read() -> None:
    """A reader behind its partition's high watermark (a replay at full speed, a worker short
    of CPU) has the order's events coming: the order waits past the max wait. Once the
    partition is read to its end and still has not passed the order, the max wait applies."""
    f = feed()
    f.apply(INVENTORY, 0, [stock("A", T + 5_000, 5)], [0], now=0.0)
    f.apply(ZIP_CODES, 0, [zipped("1", T + 5_000)], [0], now=0.0)
    f.apply(PAYMENTS, 3, [paid("o", T + 5_000)], [0], now=0.0)
    f.apply(INVENTORY, 1, [stock("B", T - 1_000, 5)], [0], now=0.0)  # behind the order ...
    f.note_position(INVENTORY, 1, 0, 50_000, now=0.0)                # ... with 49,999 to read
    order, late = T + 300, MAX_WAIT_S * 3
    assert admit(f, order, now=late, waited=late) == (False, False)  # waits: records left
    assert admit(f, T - 2_000, now=0.0) == (True, False)  # an earlier order is not held
    f.apply(INVENTORY, 1, [stock("B", T - 500, 5)], [49_999], now=late)  # read to its end
    f.note_position(INVENTORY, 1, 0, 50_000, now=late)
    assert admit(f, order, now=late, waited=late) == (False, True)  # now the max wait applies
