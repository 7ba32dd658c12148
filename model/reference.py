"""Reference data (inventory, payments, zip codes) with a vectorised as-of lookup.

Loaded once from the users' CSVs; after that every lookup is numpy over a whole batch, with
no pandas and no per-order Python objects. ``pandas.merge_asof(direction="backward")`` is the
oracle this must agree with, row for row, ties included (the test suite checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

MISSING_STATUS = "MISSING"
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class ReferenceDataError(ValueError):
    """A reference CSV is missing, lacks a column, or holds a value that cannot be read."""


def parse_timestamps(values: pd.Series, what: str) -> np.ndarray:
    """``YYYY-MM-DD HH:MM:SS`` (UTC) strings -> int64 seconds since the epoch."""
    parsed = pd.to_datetime(values, format=_TIME_FORMAT, errors="coerce")
    bad = parsed.isna()
    if bad.any():
        first = values[bad].iloc[0]
        raise ReferenceDataError(
            f"{what}: {int(bad.sum())} timestamp(s) not in YYYY-MM-DD HH:MM:SS form, "
            f"first {first!r}")
    return parsed.to_numpy("datetime64[s]").astype(np.int64)


def read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise ReferenceDataError(f"{path} does not exist")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReferenceDataError(f"{path} lacks column(s) {', '.join(missing)}; "
                                 f"it has {', '.join(frame.columns)}")
    return frame[columns]


@dataclass(frozen=True)
class AsOfTable:
    """Per key, a history of (time, value); answers "latest value at or before t" for a batch.

    Rows are sorted by (key, time) stably, so among rows with the same key and time the last
    one in file order wins, as in merge_asof. Each row is placed on one int64 axis,
    ``key_id * span + (time - t0)``, so one ``searchsorted`` answers a whole batch.
    """

    key_index: dict[str, int]
    row_keys: np.ndarray     # int64 key id of each sorted row
    positions: np.ndarray    # int64 position of each sorted row on the combined axis
    values: np.ndarray       # value of each sorted row
    t0: int
    span: int

    @classmethod
    def build(cls, keys: np.ndarray, times: np.ndarray, values: np.ndarray) -> AsOfTable:
        uniques, key_ids = np.unique(keys, return_inverse=True)
        key_ids = key_ids.astype(np.int64)
        t0 = int(times.min()) - 1 if len(times) else 0
        span = (int(times.max()) - t0 + 1) if len(times) else 1
        if len(uniques) * span >= 2**62:
            raise ReferenceDataError(
                f"{len(uniques)} keys over {span} seconds is too large for one as-of table")
        order = np.lexsort((times, key_ids))  # stable: ties keep file order
        row_keys = key_ids[order]
        return cls(
            key_index={str(k): i for i, k in enumerate(uniques)},
            row_keys=row_keys,
            positions=row_keys * span + (times[order] - t0),
            values=values[order],
            t0=t0,
            span=span,
        )

    def key_ids(self, keys: list[str]) -> np.ndarray:
        index = self.key_index
        return np.fromiter((index.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))

    def lookup(self, keys: list[str], times: np.ndarray) -> np.ndarray:
        """Row index of the latest row per (key, time), or -1 where the key has none by then."""
        key_ids = self.key_ids(keys)
        # Times before the table starts clip to t0 (before every row); later ones to the end.
        offsets = np.clip(times - self.t0, 0, self.span - 1)
        rows = np.searchsorted(self.positions, key_ids * self.span + offsets, side="right") - 1
        found = (key_ids >= 0) & (rows >= 0)
        found[found] = self.row_keys[rows[found]] == key_ids[found]
        return np.where(found, rows, -1)

    def values_at(self, rows: np.ndarray, fill: float | int) -> np.ndarray:
        """``values[rows]``, with ``fill`` where a row is -1 (nothing at or before the time)."""
        if len(self.values) == 0:
            return np.full(len(rows), fill, dtype=np.result_type(self.values, type(fill)))
        return np.where(rows >= 0, self.values[rows], fill)


@dataclass(frozen=True)
class ReferenceTables:
    inventory: AsOfTable          # values: float64 stock level
    payments: AsOfTable           # values: int64 code into payment_statuses
    payment_statuses: np.ndarray  # object array of status names; index 0 is MISSING
    zip_available_from: dict[str, int]

    @classmethod
    def from_frames(cls, inventory: pd.DataFrame, payments: pd.DataFrame,
                    zip_codes: pd.DataFrame) -> ReferenceTables:
        try:
            stock = inventory["inventory"].astype(np.float64).to_numpy()
        except ValueError as exc:
            raise ReferenceDataError(f"inventory.csv: non-numeric inventory ({exc})") from None
        statuses = payments["payment_status"].to_numpy(dtype=object)
        vocabulary = np.array([MISSING_STATUS, *sorted(set(statuses) - {MISSING_STATUS})],
                              dtype=object)
        codes = np.searchsorted(vocabulary[1:].astype(str), statuses.astype(str)) + 1
        if (statuses == MISSING_STATUS).any():
            codes[statuses == MISSING_STATUS] = 0
        zip_times = parse_timestamps(zip_codes["available_from"], "zip_codes.csv available_from")
        return cls(
            inventory=AsOfTable.build(
                inventory["sku_code"].to_numpy(dtype=object),
                parse_timestamps(inventory["timestamp"], "inventory.csv timestamp"), stock),
            payments=AsOfTable.build(
                payments["order_id"].to_numpy(dtype=object),
                parse_timestamps(payments["timestamp"], "payments.csv timestamp"),
                codes.astype(np.int64)),
            payment_statuses=vocabulary,
            # A zip listed twice is available from its earliest date.
            zip_available_from=dict(sorted(zip(zip_codes["zip_code"], zip_times.tolist(),
                                               strict=True), key=lambda kv: -kv[1])),
        )

    @classmethod
    def load(cls, data_dir: str | Path) -> ReferenceTables:
        """Read inventory.csv, payments.csv and zip_codes.csv from ``data_dir``."""
        data_dir = Path(data_dir)
        return cls.from_frames(
            read_csv(data_dir / "inventory.csv", ["sku_code", "timestamp", "inventory"]),
            read_csv(data_dir / "payments.csv", ["order_id", "timestamp", "payment_status"]),
            read_csv(data_dir / "zip_codes.csv", ["zip_code", "available_from"]),
        )
