"""Orders as columns: what the feature code takes, whether from orders.csv or a Kafka batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.features import FeatureBatch, compute_features
from model.reference import ReferenceTables, parse_timestamps, read_csv

ORDER_COLUMNS = ["order_id", "customer_id", "timestamp", "sku_code", "zip_code"]


@dataclass(frozen=True)
class OrderColumns:
    order_id: list[str]
    customer_id: list[str]
    sku_code: list[str]
    zip_code: list[str]
    timestamp_ms: np.ndarray  # int64, UTC milliseconds since the epoch

    def __len__(self) -> int:
        return len(self.order_id)

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> OrderColumns:
        """Columns from decoded Avro order records."""
        return cls(
            order_id=[r["order_id"] for r in records],
            customer_id=[r["customer_id"] for r in records],
            sku_code=[r["sku_code"] for r in records],
            zip_code=[r["zip_code"] for r in records],
            timestamp_ms=np.fromiter((r["timestamp_ms"] for r in records), dtype=np.int64,
                                     count=len(records)),
        )

    def records(self) -> list[dict[str, Any]]:
        """One Avro order record per row, in order."""
        return [
            {"order_id": o, "customer_id": c, "timestamp_ms": int(t), "sku_code": s, "zip_code": z}
            for o, c, t, s, z in zip(self.order_id, self.customer_id, self.timestamp_ms,
                                     self.sku_code, self.zip_code, strict=True)
        ]

    def features(self, reference: ReferenceTables) -> FeatureBatch:
        return compute_features(reference, self.order_id, self.sku_code, self.zip_code,
                                self.timestamp_ms)


def read_orders_csv(path: str | Path, limit: int | None = None) -> OrderColumns:
    frame = read_csv(Path(path), ORDER_COLUMNS)
    if limit is not None:
        frame = frame.iloc[:limit]
    return OrderColumns(
        order_id=frame["order_id"].tolist(),
        customer_id=frame["customer_id"].tolist(),
        sku_code=frame["sku_code"].tolist(),
        zip_code=frame["zip_code"].tolist(),
        timestamp_ms=parse_timestamps(frame["timestamp"], f"{path} timestamp") * 1000,
    )
