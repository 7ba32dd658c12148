"""The reference policy that labels training data (and that the model must reproduce)."""

from __future__ import annotations

import numpy as np

from triage.model.features import FeatureBatch

CLASSES = ("Deliver", "HoldCheckAvailability", "HoldCheckDelivery", "HoldCheckPayment", "Decline")


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
