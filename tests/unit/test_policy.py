"""The labelling policy: each rule, and the order in which the rules win."""

from __future__ import annotations

import numpy as np
import pytest

from triage.model.features import FeatureBatch
from triage.model.policy import BURST_ORDERS_1H, CLASSES, label, label_v2

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


@pytest.mark.parametrize(("row", "orders_1h", "expected"), [
    ((12, 10.0, "OK", True), BURST_ORDERS_1H, "Decline"),       # a burst v1 delivers
    ((12, 10.0, "OK", True), BURST_ORDERS_1H - 1, "Deliver"),   # one order short of it
    ((12, 10.0, "OK", True), NAN, "Deliver"),                   # unknown: no burst
    ((2, 10.0, "OK", True), BURST_ORDERS_1H, "Decline"),        # declined by night anyway
    ((12, 0.0, "OK", True), 10, "HoldCheckAvailability"),       # the holds come first
    ((12, 10.0, "OK", False), 10, "HoldCheckDelivery"),
    ((12, 10.0, "DECLINED", True), 10, "HoldCheckPayment"),
])
def test_policy_v2_declines_a_customer_s_burst_after_the_holds(
        row: tuple[int, float, str, bool], orders_1h: float, expected: str) -> None:
    features = batch(row)
    features.columns["customer_orders_1h"][:] = orders_1h
    assert label_v2(features).tolist() == [expected]
    assert label(features).tolist() == label(batch(row)).tolist()  # v1 does not read it
