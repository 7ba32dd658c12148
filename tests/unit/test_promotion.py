"""The rules of changing the active model (model/registry.py): the promotion gates and the rules
of the state, as `triage models` applies them, on figures given here. No broker, no files:
tests/test_models.py runs the command itself against a broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from triage.bus.errors import EXIT_CONFIGURATION, ConfigurationError, exit_status
from triage.model.registry import (
    ChangeRefused,
    PromotionRefused,
    Version,
    check_accuracy,
    check_live,
    check_rollback,
    check_shadow,
)


def version(holdout_accuracy: float) -> Version:
    return Version("xgb-0123456789ab", Path("models/xgb-0123456789ab"), "2024-01-01T00:00:00Z",
                   holdout_accuracy, {})


@pytest.mark.parametrize("error", [PromotionRefused("live", "no"), ChangeRefused("no")])
def test_a_refusal_is_a_configuration_error_and_exits_2(error: Exception) -> None:
    assert isinstance(error, ConfigurationError)
    assert exit_status(error) == EXIT_CONFIGURATION == 2


@pytest.mark.parametrize("accuracy", [0.995, 0.999, 1.0])
def test_the_accuracy_gate_passes_a_version_at_or_above_the_minimum(accuracy: float) -> None:
    assert check_accuracy(version(accuracy), 0.995) is False
    assert check_accuracy(version(accuracy), 0.995, force=True) is False  # nothing to force


def test_the_accuracy_gate_refuses_a_version_below_the_minimum_unless_forced() -> None:
    with pytest.raises(PromotionRefused) as refused:
        check_accuracy(version(0.99), 0.995)
    assert refused.value.gate == "min_accuracy"
    assert str(refused.value) == ("xgb-0123456789ab's holdout accuracy 99.0000% is below "
                                  "--min-accuracy 99.50%; not promoted (--force overrides)")
    assert check_accuracy(version(0.99), 0.995, force=True) is True  # forced: recorded so


def test_the_accuracy_gate_refuses_a_version_whose_manifest_records_no_accuracy() -> None:
    """Version.of reads a manifest without metrics as NaN: not a pass (NaN < x is False)."""
    with pytest.raises(PromotionRefused, match="records no holdout accuracy") as refused:
        check_accuracy(version(float("nan")), 0.5)
    assert refused.value.gate == "min_accuracy"
    assert check_accuracy(version(float("nan")), 0.5, force=True) is True


@pytest.mark.parametrize("shadow, active", [(0.98, 0.97), (0.97, 0.97), (1.0, 1.0)])
def test_the_live_gate_passes_a_version_that_agrees_with_the_policy_as_often(
        shadow: float, active: float) -> None:
    assert check_live("xgb-b", "xgb-a", 1_000, shadow, active) is False
    assert check_live("xgb-b", "xgb-a", 1_000, shadow, active, force=True) is False


def test_the_live_gate_refuses_a_version_that_agrees_with_the_policy_less_often() -> None:
    with pytest.raises(PromotionRefused) as refused:
        check_live("xgb-b", "xgb-a", 1_000, 0.80, 0.999)
    assert refused.value.gate == "live"
    assert str(refused.value) == ("xgb-b agrees with the policy less often on live traffic "
                                  "(80.00%) than the active version (99.90%); not promoted "
                                  "(--force overrides)")
    assert check_live("xgb-b", "xgb-a", 1_000, 0.80, 0.999, force=True) is True


def test_the_live_gate_does_not_apply_without_orders_scored_by_both() -> None:
    """No shadow run in the window: compare gives 0 pairs and 0.0 for both figures."""
    assert check_live("xgb-b", "xgb-a", 0, 0.0, 0.0) is False
    assert check_live("xgb-b", "xgb-a", 0, 0.0, 1.0) is False
    assert check_live("xgb-b", "xgb-a", 0, 0.0, 1.0, force=True) is False  # not forced past


def test_a_shadow_needs_an_active_version_and_another_version() -> None:
    with pytest.raises(ChangeRefused, match="no version is active yet"):
        check_shadow(None, "xgb-b")
    with pytest.raises(ChangeRefused, match="no version is active yet"):
        check_shadow(None, None)  # --clear with nothing active
    with pytest.raises(ChangeRefused, match="xgb-a is the active version: shadow another one"):
        check_shadow("xgb-a", "xgb-a")
    check_shadow("xgb-a", "xgb-b")
    check_shadow("xgb-a", None)  # --clear


def test_a_rollback_goes_to_the_previous_version_and_needs_one() -> None:
    assert check_rollback("xgb-b", "xgb-a") == "xgb-a"
    for active, previous in ((None, None), ("xgb-a", None)):
        with pytest.raises(ChangeRefused, match="nothing to roll back to"):
            check_rollback(active, previous)

