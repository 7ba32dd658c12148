"""The autoscaling rule, sample by sample (the loop around it is tested in test_delivery.py)."""

from __future__ import annotations

import pytest

from triage.bus.settings import SettingsError
from triage.consumer.autoscale import Autoscaler


def decisions(scaler: Autoscaler, lags: list[int], workers: int) -> list[int]:
    out = []
    for lag in lags:
        change = scaler.decide(lag, workers).change
        workers += change
        out.append(change)
    return out


def test_grows_only_when_lag_grew_over_a_full_window() -> None:
    scaler = Autoscaler(1, 3, window=3, grow_above=100)
    assert decisions(scaler, [200, 300, 400], workers=1) == [0, 0, +1]
    # The window starts over after a decision; a falling backlog is left alone.
    assert decisions(scaler, [900, 800, 700], workers=2) == [0, 0, 0]


def test_small_or_shrinking_lag_does_not_grow() -> None:
    below = Autoscaler(1, 3, window=3, grow_above=100)
    assert decisions(below, [10, 20, 90], workers=1) == [0, 0, 0]
    falling = Autoscaler(1, 3, window=3, grow_above=100)
    assert decisions(falling, [500, 400, 450], workers=1) == [0, 0, 0]  # not above the start


def test_never_beyond_max_or_below_min() -> None:
    scaler = Autoscaler(2, 3, window=2, grow_above=0)
    assert decisions(scaler, [1, 2, 3, 4, 5, 6], workers=3) == [0] * 6
    assert decisions(scaler, [0, 0, 0, 0], workers=2) == [0] * 4


def test_shrinks_once_the_whole_window_is_drained() -> None:
    scaler = Autoscaler(1, 3, window=3)
    assert decisions(scaler, [5, 0, 0, 0], workers=3) == [0, 0, 0, -1]
    assert decisions(scaler, [0, 0, 0], workers=2) == [0, 0, -1]


def test_nonsense_bounds_are_refused() -> None:
    with pytest.raises(SettingsError, match="--min"):
        Autoscaler(3, 2)
    with pytest.raises(SettingsError, match="--min"):
        Autoscaler(0, 2)
