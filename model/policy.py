"""The reference policies that label training data (and that a model must reproduce): ``v1``,
the original exercise's, and ``v2``, which also declines bursts (a customer's orders in quick
succession, read from the windowed feature ``customer_orders_1h``: model/windows.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from triage.model.features import FeatureBatch

CLASSES = ("Deliver", "HoldCheckAvailability", "HoldCheckDelivery", "HoldCheckPayment", "Decline")
# v2: an order is a burst when its customer placed at least this many orders in the hour before
# it (so its fourth order within an hour). 3 of 20,000 generated orders reach it without the
# customer-bursts scenario (triage datagen --shift customer-bursts).
BURST_ORDERS_1H = 3


def label(features: FeatureBatch) -> np.ndarray:
    """Recommendation per order, first matching rule wins:

    inventory missing or <= 0 -> HoldCheckAvailability; zip not available -> HoldCheckDelivery;
    payment not OK -> HoldCheckPayment; hour < 6 -> Decline; else Deliver.
    """
    no_stock = np.isnan(features.inventory) | (np.nan_to_num(features.inventory, nan=0.0) <= 0)
    return np.select(
        [no_stock, ~features.zip_code_available, features.payment_status != "OK",
         features.order_hour_of_day < 6],
        ["HoldCheckAvailability", "HoldCheckDelivery", "HoldCheckPayment", "Decline"],
        default="Deliver",
    ).astype(object)


def label_v2(features: FeatureBatch) -> np.ndarray:
    """Recommendation per order by policy v2: policy v1, except that a burst (the customer's
    ``customer_orders_1h`` at least ``BURST_ORDERS_1H``) is declined where v1 would deliver it:
    after the stock, zip and payment holds, as v1's night rule is. An unknown
    (null) count is no burst."""
    v1 = label(features)
    burst = np.nan_to_num(features.customer_orders_1h, nan=0.0) >= BURST_ORDERS_1H
    return np.where(burst & (v1 == "Deliver"), "Decline", v1).astype(object)


POLICIES: dict[str, Callable[[FeatureBatch], np.ndarray]] = {"v1": label, "v2": label_v2}
"""Policy name -> labelling function (``triage train --policy``)."""
POLICY_FEATURES: dict[str, tuple[str, ...]] = {"v1": (), "v2": ("customer_orders_1h",)}
"""Policy name -> the windowed features it reads: a model trained on it must read them too."""
