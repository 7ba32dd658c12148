"""The four model features, computed for a whole batch at once.

This is the only implementation: training calls it over the history, the scorer over each
consumed batch, so the two cannot drift apart. Definitions (DESIGN.md):

* ``order_hour_of_day``: hour 0-23 of the order timestamp, UTC.
* ``inventory``: latest stock of the SKU at or before the order; NaN when there is none.
* ``payment_status``: latest status of the order at or before it; ``MISSING`` when none.
* ``zip_code_available``: order strictly after the zip's ``available_from``; False if unknown.

Order times arrive as epoch milliseconds; reference times have whole seconds, so "at or before"
compares ``floor(ms / 1000)`` with the reference second, which is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from triage.model.reference import ReferenceTables

FEATURE_NAMES = ("order_hour_of_day", "inventory", "payment_status", "zip_code_available")


@dataclass(frozen=True)
class FeatureBatch:
    order_hour_of_day: np.ndarray   # int64
    inventory: np.ndarray           # float64, NaN = missing
    payment_status: np.ndarray      # object array of status names
    zip_code_available: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.order_hour_of_day)


def compute_features(reference: ReferenceTables, order_ids: list[str], skus: list[str],
                     zip_codes: list[str], timestamps_ms: np.ndarray) -> FeatureBatch:
    seconds = np.floor_divide(np.asarray(timestamps_ms, dtype=np.int64), 1000)
    hours = np.floor_divide(seconds, 3600) % 24

    inventory = reference.inventory.values_at(reference.inventory.lookup(skus, seconds), np.nan)
    status_codes = reference.payments.values_at(reference.payments.lookup(order_ids, seconds), 0)

    available_from = reference.zip_available_from
    # An unknown zip gets the largest int64, which no order time is after.
    zip_from = np.fromiter((available_from.get(z, np.iinfo(np.int64).max) for z in zip_codes),
                           dtype=np.int64, count=len(zip_codes))
    return FeatureBatch(
        order_hour_of_day=hours,
        inventory=inventory,
        payment_status=reference.payment_statuses[status_codes],
        zip_code_available=seconds > zip_from,
    )
