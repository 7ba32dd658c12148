"""Training-time distributions of the features and predictions, kept in the manifest so that
the drift monitor compares live traffic with what the model was trained on."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from triage.model.drift import (
    AVAILABILITY_LABELS,
    availability_codes,
    level_bin_counts,
    level_edges,
)
from triage.model.features import FeatureBatch

INVENTORY_QUANTILES = tuple(q / 10 for q in range(1, 10))


def _frequencies(values: np.ndarray) -> dict[str, float]:
    counts = Counter(values.tolist())
    total = sum(counts.values())
    return {str(k): v / total for k, v in sorted(counts.items())}


def training_baseline(features: FeatureBatch, recommendations: np.ndarray) -> dict[str, Any]:
    """``recommendations`` are the model's predictions on the training rows: the monitor
    compares them with live predictions. Inventory also gets the drift monitor's bins
    (``model.drift``): counts missing / out of stock / in stock, and in-stock level deciles."""
    stock = features.inventory[~np.isnan(features.inventory)]
    in_stock = stock[stock > 0]
    edges = level_edges(in_stock)
    availability = np.bincount(availability_codes(features.inventory), minlength=3)
    return {
        "rows": len(features),
        "order_hour_of_day": (np.bincount(features.order_hour_of_day, minlength=24)
                              / len(features)).tolist(),
        "inventory": {
            "missing_rate": float(np.isnan(features.inventory).mean()),
            "quantiles": dict(zip(map(str, INVENTORY_QUANTILES),
                                  np.quantile(stock, INVENTORY_QUANTILES).tolist(), strict=True))
            if len(stock) else {},
            "availability_counts": dict(zip(AVAILABILITY_LABELS, availability.tolist(),
                                            strict=True)),
            "level_bins": {"edges": edges.tolist(),
                           "counts": level_bin_counts(edges, in_stock).tolist()},
        },
        "payment_status": _frequencies(features.payment_status),
        "zip_code_available": float(features.zip_code_available.mean()),
        "recommendation": _frequencies(recommendations),
    }
