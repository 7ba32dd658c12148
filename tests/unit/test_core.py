"""The scoring core without a broker: every dead-letter route, hook retry, the hook deadline,
the scoring fallback, decoded input with no Kafka coordinates, and offline equality."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import CODEC, PoisonedInventory, kafka
from triage.bus.clients import Source
from triage.model import artifact
from triage.model.orders import OrderColumns, read_orders_csv
from triage.model.reference import ReferenceTables
from triage.schemas.codec import Codec, columns_encoder
from triage.schemas.compiled import layout_of
from triage.scoring.core import CoreConfig, Incoming, Outcome, ScoringCore, split_hooks
from triage.scoring.corrections import RetainedOrders
from triage.scoring.hooks import Rejection, ScoredBatch
from triage.scoring.sampling import sampled_indices
from triage.scoring.validation import OrderValidator
from triage.settings import Settings

DAY_MS = 86_400_000


@pytest.fixture(scope="module")
def parts(history: Path, model_dir: Path) -> tuple[artifact.Model, ReferenceTables, list[dict]]:
    return (artifact.load(model_dir), ReferenceTables.load(history),
            read_orders_csv(history / "orders.csv", limit=400).records())


def core(parts: tuple, *, hooks: list[object] = (), deadline_s: float = 30.0,
         reference: ReferenceTables | None = None, sample_rate: float = 0.05) -> ScoringCore:
    model, history_reference, _ = parts
    checks, observers = split_hooks(list(hooks))
    return ScoringCore(model, reference or history_reference, CODEC,
                       config=CoreConfig(sample_rate=sample_rate, deadline_s=deadline_s),
                       checks=[OrderValidator(Settings().validation), *checks], observers=observers)


def poisoned_reference(reference: ReferenceTables) -> ReferenceTables:
    """``reference`` with an inventory table whose lookups fail for the SKU "POISON"."""
    return ReferenceTables(
        reference.streams.values(),
        {**reference.tables, "inventory": PoisonedInventory(reference.tables["inventory"])},
        reference.vocabularies)


def position(item: Incoming) -> int:
    """Where a record of ``kafka()`` sat in its batch (its offset)."""
    assert item.source is not None
    return item.source.offset


def where(outcome: Outcome) -> dict[int, str]:
    """Position -> 'prediction' or the dead-letter reason; each position once."""
    found = {position(p.item): "prediction" for p in outcome.predictions}
    for letter in outcome.dead_letters:
        assert position(letter.item) not in found, letter
        found[position(letter.item)] = letter.reason
    assert sorted(found) == list(range(outcome.size)) and not outcome.deferred
    return found


def test_good_orders_are_predicted_exactly_as_offline_with_their_lineage(parts: tuple) -> None:
    model, reference, orders = parts
    outcome = core(parts).process(kafka([CODEC.encode(o) for o in orders]))
    assert set(where(outcome).values()) == {"prediction"}
    expected, proba = model.predict(OrderColumns.from_records(orders).features(reference))
    for scored, recommendation, row in zip(outcome.predictions, expected, proba, strict=True):
        assert scored.record["recommendation"] == recommendation
        assert [scored.record["probabilities"][c] for c in model.classes] == row.tolist()
        assert scored.key == scored.record["order_id"].encode()
        assert (scored.record["order_partition"], scored.record["order_offset"]) == (
            0, position(scored.item))
        assert scored.record["order_published_at_ms"] == 1_700_000_000_000 + position(
            scored.item)
        assert scored.record["reference_wait_expired"] is False
    sampled = {position(s.item) for s in outcome.samples}
    assert sampled == set(sampled_indices([o["order_id"] for o in orders], 0.05))


def test_the_predictions_columns_are_written_by_the_generated_encoder_as_their_records(
        parts: tuple) -> None:
    """What the worker produces (the columns, through the encoder generated for their
    layout: no record by record fallback) is what encoding each prediction record gives;
    revisions and lineage included."""
    _, _, orders = parts
    outcome = core(parts).process(kafka([CODEC.encode(o) for o in orders[:60]]))
    [batch] = outcome.scored
    encoder = columns_encoder("prediction", layout_of(batch.columns))
    assert encoder is not None
    codec = Codec("prediction")
    expected = [codec.encode(p.record) for p in outcome.predictions]
    assert encoder(batch.columns, batch.size, codec._header) == expected
    assert codec.encode_columns(batch.columns, batch.size) == expected
    assert batch.keys == [p.key for p in outcome.predictions]


def test_decoded_orders_without_coordinates_score_the_same(parts: tuple) -> None:
    """An HTTP request has no Kafka coordinates: lineage is -1, the rest is identical."""
    _, _, orders = parts
    from_kafka = core(parts).process(kafka([CODEC.encode(o) for o in orders[:50]]))
    from_http = core(parts).process([Incoming(o) for o in orders[:50]])
    for a, b in zip(from_kafka.predictions, from_http.predictions, strict=True):
        assert b.record["order_partition"] == b.record["order_offset"] == -1
        strip = ("scored_at_ms", "order_published_at_ms", "order_partition", "order_offset")
        assert {k: v for k, v in a.record.items() if k not in strip} == \
               {k: v for k, v in b.record.items() if k not in strip}


def test_every_dead_letter_route(parts: tuple) -> None:
    _, reference, orders = parts
    good = orders[0]
    now = int(time.time() * 1000)
    prediction = Codec("prediction").encode({
        "order_id": "x", "customer_id": "y", "recommendation": "Deliver", "probabilities": {},
        "model_version": "v", "features": {"order_hour_of_day": 1, "inventory": None,
                                           "payment_status": "OK", "zip_code_available": True},
        "order_timestamp_ms": 0, "scored_at_ms": 0, "order_published_at_ms": 0,
        "order_partition": 0, "order_offset": 0})
    cases = {
        "prediction": CODEC.encode(good),
        "tombstone": None,
        "unknown_framing": b"\x7fnot avro",
        "invalid_avro": CODEC.encode(good)[:14],
        "trailing_bytes": CODEC.encode(good) + b"\x00",
        "unknown_schema": prediction,
        "no_registry": b"\x00\x00\x00\x03\xe8" + CODEC.encode(good)[10:],
        "oversized": CODEC.encode({**good, "customer_id": "C" * 20_000}),
        "missing_field": CODEC.encode({**good, "sku_code": " "}),
        "invalid_field": CODEC.encode({**good, "zip_code": "1\x00"}),
        "invalid_timestamp": CODEC.encode({**good, "timestamp_ms": now + 3 * DAY_MS}),
        "scoring_failed": CODEC.encode({**good, "sku_code": "POISON"}),
    }
    poisoned = poisoned_reference(reference)
    outcome = core(parts, reference=poisoned).process(kafka(list(cases.values())))
    assert list(where(outcome).values()) == list(cases)
    assert {d.reason: d.error_class for d in outcome.dead_letters}["oversized"] == \
        "RecordTooLarge"
    assert all(d.message for d in outcome.dead_letters)


class Flaky:
    """A check hook that raises on any batch holding order ``BOOM``, and rejects ``NOPE``."""

    name = "flaky"

    def check(self, orders: list[dict]) -> list[Rejection]:
        if any(o["order_id"] == "BOOM" for o in orders):
            raise RuntimeError("cannot check BOOM")
        return [Rejection(i, "blocked", "on the list") for i, o in enumerate(orders)
                if o["order_id"] == "NOPE"]


def test_a_hook_that_raises_is_retried_order_by_order_and_blames_only_the_culprit(
        parts: tuple) -> None:
    _, _, orders = parts
    batch = [dict(o) for o in orders[:20]]
    batch[3]["order_id"], batch[7]["order_id"] = "BOOM", "NOPE"
    outcome = core(parts, hooks=[Flaky()]).process(kafka([CODEC.encode(o) for o in batch]))
    found = where(outcome)
    assert Counter(found.values()) == {"prediction": 18, "hook_failed": 1, "blocked": 1}
    assert (found[3], found[7]) == ("hook_failed", "blocked")


class Blocking:
    """Blocks until released on the first batch it sees."""

    name = "blocking"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def check(self, orders: list[dict]) -> list[Rejection]:
        self.calls += 1
        if self.calls == 1:
            self.release.wait(30)
        return []


def test_a_hook_past_the_deadline_dead_letters_its_orders_and_is_not_called_again_meanwhile(
        parts: tuple) -> None:
    _, _, orders = parts
    hook = Blocking()
    scoring = core(parts, hooks=[hook], deadline_s=0.3)
    first = scoring.process(kafka([CODEC.encode(o) for o in orders[:10]]))
    assert set(where(first).values()) == {"timeout"}
    second = scoring.process(kafka([CODEC.encode(o) for o in orders[10:20]]))  # still busy
    assert set(where(second).values()) == {"timeout"} and hook.calls == 1
    hook.release.set()
    third = scoring.process(kafka([CODEC.encode(o) for o in orders[20:30]]))
    assert set(where(third).values()) == {"prediction"} and hook.calls == 2


class HangsOnOneOrder:
    """Hangs on any batch holding the order ``HANG`` until ``release`` is set; each instance
    adds itself to ``made`` (a real factory's instances are separate objects too)."""

    name = "hangs_on_one"

    def __init__(self, release: threading.Event, made: list[object]) -> None:
        self.release = release
        made.append(self)

    def check(self, orders: list[dict]) -> list[Rejection]:
        if any(o["order_id"] == "HANG" for o in orders):
            self.release.wait(30)
        return []


def test_a_hook_that_hangs_on_one_order_costs_that_batch_and_the_later_orders_are_scored(
        parts: tuple) -> None:
    """Found re-running the fault cases: the orders behind a hung call were dead-lettered as
    ``timeout`` batch after batch ("still running a call that overran an earlier batch's
    deadline"). The hook, loaded from its factory as TRIAGE_HOOKS loads it, is renewed."""
    from triage.scoring.hooks import HookRunner

    _, _, orders = parts
    release, made = threading.Event(), []
    runner = HookRunner(HangsOnOneOrder(release, made),
                        renew=lambda: HangsOnOneOrder(release, made))
    scoring = core(parts, hooks=[runner], deadline_s=0.3)
    try:
        hung = [dict(o) for o in orders[:10]]
        hung[4]["order_id"] = "HANG"
        assert set(where(scoring.process(kafka([CODEC.encode(o) for o in hung]))).values()) \
            == {"timeout"}
        later = scoring.process(kafka([CODEC.encode(o) for o in orders[10:20]]))
        assert set(where(later).values()) == {"prediction"}
        assert len(made) == 2 and runner.abandoned == 1
        again = scoring.process(kafka([CODEC.encode(o) for o in hung]))  # the same order again
        assert set(where(again).values()) == {"timeout"}
        after = scoring.process(kafka([CODEC.encode(o) for o in orders[20:30]]))
        assert set(where(after).values()) == {"prediction"} and runner.abandoned == 2
    finally:
        release.set()


def test_a_hook_that_hangs_on_every_call_is_renewed_at_most_max_abandoned_times(
        parts: tuple) -> None:
    """Renewal is bounded: a hook that hangs on everything holds at most MAX_ABANDONED threads,
    and the batches after that wait for it (dead-lettered as timeout), as before renewal."""
    from triage.scoring.hooks import MAX_ABANDONED, HookRunner

    _, _, orders = parts
    release, made = threading.Event(), []
    runner = HookRunner(HangsOnOneOrder(release, made),
                        renew=lambda: HangsOnOneOrder(release, made))
    scoring = core(parts, hooks=[runner], deadline_s=0.5)
    try:
        batch = [dict(o) for o in orders[:5]]
        batch[0]["order_id"] = "HANG"
        for _ in range(MAX_ABANDONED + 3):
            outcome = scoring.process(kafka([CODEC.encode(o) for o in batch]))
            assert set(where(outcome).values()) == {"timeout"}
        assert runner.abandoned == MAX_ABANDONED and len(made) == MAX_ABANDONED + 1
    finally:
        release.set()


def test_a_hook_factory_that_hangs_is_called_once_and_one_that_raises_is_given_up(
        parts: tuple) -> None:
    """A renewal that has not returned is waited for by the next batch, not started again (a
    thread per batch otherwise); a factory failing 3 times in a row, or returning the instance
    in use, is not called again (its batches wait, dead-lettered as timeout)."""
    from triage.scoring.hooks import MAX_RENEWAL_FAILURES, HookRunner

    _, _, orders = parts
    release, made = threading.Event(), []
    factory_calls: list[int] = []

    def slow_factory() -> HangsOnOneOrder:
        factory_calls.append(1)
        release.wait(30)
        return HangsOnOneOrder(release, made)

    def failing_factory() -> HangsOnOneOrder:
        factory_calls.append(1)
        raise ValueError("Duplicated timeseries in CollectorRegistry")

    in_use: list[HangsOnOneOrder] = []

    def same_instance() -> HangsOnOneOrder:
        factory_calls.append(1)
        return in_use[0]

    batch = [dict(o) for o in orders[:5]]
    batch[0]["order_id"] = "HANG"
    try:
        for factory, batches, calls in ((slow_factory, 4, 1),
                                        (failing_factory, MAX_RENEWAL_FAILURES + 2,
                                         MAX_RENEWAL_FAILURES),
                                        (same_instance, 3, 1)):
            factory_calls.clear()
            in_use[:] = [HangsOnOneOrder(release, made)]
            scoring = core(parts, hooks=[HookRunner(in_use[0], renew=factory)], deadline_s=0.3)
            for _ in range(batches):
                outcome = scoring.process(kafka([CODEC.encode(o) for o in batch]))
                assert set(where(outcome).values()) == {"timeout"}
            assert len(factory_calls) == calls, factory
    finally:
        release.set()


def test_an_observe_hook_that_changes_its_batch_changes_nothing_published(
        parts: tuple) -> None:
    """The hooks see the scored batch; the predictions are built from the same columns, so a
    hook gets its own copies: what it writes into them is not published."""
    _, _, orders = parts
    records = kafka([CODEC.encode(o) for o in orders[:40]])

    class Meddler:
        def observe(self, batch: ScoredBatch) -> None:
            batch.probabilities[:] = 0.0
            batch.recommendations[:] = ["Decline"] * len(batch.recommendations)
            batch.orders.order_id[:] = ["X"] * len(batch.orders)
            batch.orders.timestamp_ms[:] = 0

    meddled = core(parts, hooks=[Meddler()]).process(records)
    clean = core(parts).process(records)
    codec = Codec("prediction")
    assert [p.record | {"scored_at_ms": 0} for p in meddled.predictions] == \
        [p.record | {"scored_at_ms": 0} for p in clean.predictions]
    assert [len(codec.encode_columns(b.columns, b.size)) for b in meddled.scored] == [40]
    assert [codec.decode(v)["order_id"] for b in meddled.scored
            for v in codec.encode_columns(b.columns, b.size)] == [o["order_id"]
                                                                  for o in orders[:40]]


def test_the_retained_order_of_a_batch_is_the_later_record_whatever_the_partitions(
        parts: tuple) -> None:
    """One order_id read from two partitions in one batch (a producer that changed its
    partitioner): the record later in the batch is the one kept as published last."""
    model, reference, orders = parts
    scoring = ScoringCore(model, reference, CODEC, config=CoreConfig(),
                          retained=RetainedOrders(3_600_000))
    order = orders[0]
    batch = [Incoming(CODEC.encode(order), b"k", Source("orders", 5, 10, 1_700_000_000_000)),
             Incoming(CODEC.encode(order), b"k", Source("orders", 2, 20, 1_700_000_000_001))]
    scoring.process(batch)
    assert scoring.retained is not None
    found = scoring.retained.latest(order["order_id"])
    assert found is not None
    kept, row = found
    assert (kept.partition, int(kept.offset[row])) == (2, 20)


def test_scoring_that_fails_for_one_order_rescoring_the_batch_one_by_one(parts: tuple) -> None:
    _, reference, orders = parts
    batch = [dict(o) for o in orders[:30]]
    batch[11]["sku_code"] = "POISON"
    poisoned = poisoned_reference(reference)
    outcome = core(parts, reference=poisoned).process(kafka([CODEC.encode(o) for o in batch]))
    found = where(outcome)
    assert found[11] == "scoring_failed"
    assert Counter(found.values()) == {"prediction": 29, "scoring_failed": 1}
    assert len(outcome.shadow_predictions) == 0  # no shadow model here; with one, below
    scored = {position(p.item): p.record for p in outcome.predictions}
    clean = core(parts).process(kafka([CODEC.encode(o) for o in batch[:11]]))
    for p in clean.predictions:  # the rest are scored as they would have been
        assert np.isclose(scored[position(p.item)]["probabilities"]["Deliver"],
                          p.record["probabilities"]["Deliver"])


def test_a_shadow_model_scores_every_order_the_one_by_one_rescoring_scored(
        parts: tuple) -> None:
    model, reference, orders = parts
    batch = [dict(o) for o in orders[:30]]
    batch[11]["sku_code"] = "POISON"
    poisoned = poisoned_reference(reference)
    scoring = core(parts, reference=poisoned)
    scoring.shadow = model
    outcome = scoring.process(kafka([CODEC.encode(o) for o in batch]))
    assert sorted(position(p.item) for p in outcome.shadow_predictions) == \
        sorted(position(p.item) for p in outcome.predictions)
    assert len(outcome.shadow_predictions) == 29
