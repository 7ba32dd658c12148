"""The labelling policy: each rule, and the order in which the rules win."""

from __future__ import annotations

import numpy as np
import pytest

from triage.model.features import FeatureBatch
from triage.model.policy import CLASSES, label

NAN = float("nan")


def batch(*rows: tuple[int, float, str, bool]) -> FeatureBatch:
    hours, stock, status, zips = zip(*rows, strict=True)
    return FeatureBatch(np.array(hours), np.array(stock, dtype=float),
                        np.array(status, dtype=object), np.array(zips, dtype=bool))


@pytest.mark.parametrize(("row", "expected"), [
    ((12, 10.0, "OK", True), "Deliver"),
    ((6, 1.0, "OK", True), "Deliver"),                    # 06:00 is no longer night
    ((5, 10.0, "OK", True), "Decline"),
    ((0, 10.0, "OK", True), "Decline"),
    ((12, 10.0, "PENDING", True), "HoldCheckPayment"),
    ((12, 10.0, "MISSING", True), "HoldCheckPayment"),
    ((12, 10.0, "OK", False), "HoldCheckDelivery"),
    ((12, 0.0, "OK", True), "HoldCheckAvailability"),
    ((12, -3.0, "OK", True), "HoldCheckAvailability"),
    ((12, NAN, "OK", True), "HoldCheckAvailability"),
    # Priority: availability > delivery > payment > night.
    ((2, NAN, "DECLINED", False), "HoldCheckAvailability"),
    ((2, 5.0, "DECLINED", False), "HoldCheckDelivery"),
    ((2, 5.0, "DECLINED", True), "HoldCheckPayment"),
])
def test_rule(row: tuple[int, float, str, bool], expected: str) -> None:
    assert label(batch(row)).tolist() == [expected]


def test_labels_are_the_five_recommendations() -> None:
    rows = [(h, s, p, z) for h in (3, 12) for s in (NAN, 5.0) for p in ("OK", "X")
            for z in (True, False)]
    assert set(label(batch(*rows)).tolist()) == set(CLASSES)
