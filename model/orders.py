"""Orders as columns: what the feature code takes, whether from orders.csv or a Kafka batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.model.features import FeatureBatch, compute_features
from triage.model.reference import ReferenceTables, parse_timestamps_lenient, read_csv
from triage.model.windows import WINDOWED_FEATURES, declared, offline_values

ORDER_COLUMNS = ["order_id", "customer_id", "timestamp", "sku_code", "zip_code"]


@dataclass(frozen=True)
class SkippedRow:
    """A row of orders.csv that cannot become an order record at all; it is reported, not
    published. (A row with an empty or malformed id *is* published: the scorer dead-letters
    it with the reason.)"""

    line: int    # line of the file, the header being line 1
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True)
class OrderColumns:
    order_id: list[str]
    customer_id: list[str]
    sku_code: list[str]
    zip_code: list[str]
    timestamp_ms: np.ndarray  # int64, UTC milliseconds since the epoch
    skipped: tuple[SkippedRow, ...] = ()  # rows of the file left out (read_orders_csv)

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

    def features(self, reference: ReferenceTables, windowed: Sequence[str] = ()
                 ) -> FeatureBatch:
        """Every feature of these orders, as of each order's own millisecond; the windowed
        features named in ``windowed`` computed offline over these same orders
        (:meth:`windowed_values`), the others null."""
        return compute_features(reference, self.order_id, self.sku_code, self.zip_code,
                                self.timestamp_ms, self.windowed_values(windowed))

    def windowed_values(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Windowed feature name -> float64 values (NaN for null), computed offline, point in
        time, over these orders as the whole history (model/windows.py ``offline_values``).
        Raises KeyError for a name that is no declared windowed feature."""
        if not names:
            return {}
        import pandas as pd  # training only: a serving process never imports pandas

        features = declared(WINDOWED_FEATURES)
        frame = pd.DataFrame({"order_id": self.order_id, "timestamp_ms": self.timestamp_ms,
                              "customer_id": self.customer_id, "sku_code": self.sku_code,
                              "zip_code": self.zip_code})
        return {name: np.array([np.nan if v is None else v
                                for v in offline_values(frame, features[name])],
                               dtype=np.float64) for name in names}


def read_orders_csv(path: str | Path, limit: int | None = None,
                    encoding: str = "utf-8") -> OrderColumns:
    """The first ``limit`` rows (all by default) of an orders CSV, as columns.

    Each row is handled on its own: one whose timestamp is not ``YYYY-MM-DD HH:MM:SS`` cannot
    become an order record and is left out, listed in ``skipped``; empty or malformed ids are
    kept (the scorer dead-letters them with the reason). Only a file that cannot be read at
    all (missing, lacking a column, not ``encoding`` text) raises ReferenceDataError.
    """
    frame = read_csv(Path(path), ORDER_COLUMNS, encoding)
    if limit is not None:
        frame = frame.iloc[:limit]
    return orders_of_frame(frame)


def orders_of_frame(frame: Any) -> OrderColumns:
    """Rows in the columns of orders.csv (``ORDER_COLUMNS``, as text) -> columns; rows whose
    timestamp is not ``YYYY-MM-DD HH:MM:SS`` are left out and listed in ``skipped`` with their
    line (row + 2). The validation of ``triage replay`` and ``triage produce`` alike."""
    seconds, bad = parse_timestamps_lenient(frame["timestamp"])
    skipped = tuple(
        SkippedRow(int(i) + 2, f"timestamp {frame['timestamp'].iloc[i]!r} is not "
                               "YYYY-MM-DD HH:MM:SS")
        for i in np.flatnonzero(bad))
    if skipped:
        frame, seconds = frame[~bad], seconds[~bad]
    return OrderColumns(
        order_id=frame["order_id"].tolist(),
        customer_id=frame["customer_id"].tolist(),
        sku_code=frame["sku_code"].tolist(),
        zip_code=frame["zip_code"].tolist(),
        timestamp_ms=seconds * 1000,
        skipped=skipped,
    )
