"""The oracle under realistic producer timing, without a broker (bench/timing.py): the four
streams published with independent random delays up to 3 s, pauses followed by bursts, events
out of order within their partitions, producer clocks ahead within the skew bound, payments
placed by murmur2 or at random. Whatever the timing, every order's last revision has the
features pandas.merge_asof gives over all the events, and every first prediction that differs
is flagged (reference_wait_expired) or followed by a correction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import merge_asof_features
from triage.bench.timing import Timing, publish, simulate, store_history
from triage.model import artifact
from triage.model.artifact import Model
from triage.scoring.settings import ReferenceSettings

REFERENCE = ReferenceSettings(reference_lateness_ms=2_000, reference_max_wait_ms=5_000,
                              max_clock_skew_ms=1_000)

INVENTORY, PAYMENTS, ZIP_CODES = "inventory", "payments", "zip_codes"  # model/streams.py


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Model:
    return artifact.load(model_dir)


def check(model: Model, seed: int, timing: Timing, orders: int = 40) -> tuple[int, int]:
    rng = np.random.default_rng(seed)
    events = publish(rng, store_history(rng, orders), timing)
    result = simulate(model, events, REFERENCE)
    expected = merge_asof_features(events)
    assert set(result.predictions) == set(expected)  # every order scored, none lost
    first_counts = [sum(r["revision"] == 1 for r in records)
                    for records in result.predictions.values()]
    assert set(first_counts) == {1}  # one first prediction each
    wrong, silent = [], []
    for order_id, records in result.predictions.items():
        last = max(records, key=lambda r: r["revision"])
        assert [r["revision"] for r in records] == list(range(1, len(records) + 1))
        if last["features"] != expected[order_id]:
            wrong.append((order_id, last["features"], expected[order_id]))
        first = records[0]
        if first["features"] != expected[order_id] and not first["reference_wait_expired"] \
                and len(records) == 1:
            silent.append(order_id)
    assert wrong == [], f"last revisions differ from merge_asof: {wrong[:2]}"
    assert silent == [], f"first predictions wrong without a flag or a correction: {silent}"
    return result.corrections, result.flagged


TIMINGS = st.builds(Timing, max_delay_ms=st.integers(0, 3_000), pauses=st.integers(0, 2),
                    pause_ms=st.integers(0, 6_000), skew_ms=st.integers(0, 1_000),
                    foreign_payments=st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), timing=TIMINGS)
def test_last_revisions_equal_merge_asof_and_no_first_prediction_is_silently_wrong(
        model: Model, seed: int, timing: Timing) -> None:
    check(model, seed, timing)


def test_delays_within_the_allowance_need_no_correction(model: Model) -> None:
    """Every record published within the lateness allowance (1.5 s < 2 s), no pauses: the
    first predictions are already right, nothing is flagged or corrected."""
    corrections, flagged = check(model, 7, Timing(max_delay_ms=1_500, pauses=0), orders=80)
    assert (corrections, flagged) == (0, 0)


def test_delays_past_the_allowance_are_corrected(model: Model) -> None:
    """Records up to 3 s late and a 6 s pause: some first predictions are wrong, and each of
    those is corrected (check() holds every one to merge_asof)."""
    corrections, _ = check(model, 11, Timing(max_delay_ms=3_000, pauses=2, pause_ms=6_000),
                           orders=80)
    assert corrections > 0
