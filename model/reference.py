"""Reference data (inventory, payments, zip codes) with a vectorised as-of lookup.

Loaded once from the users' CSVs; after that every lookup is numpy over a whole batch, with
no pandas and no per-order Python objects. ``pandas.merge_asof(direction="backward")`` is the
oracle this must agree with, row for row, ties included (the test suite checks it).
"""

from __future__ import annotations

import codecs
import csv
import io
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from triage.bus.errors import ConfigurationError

MISSING_STATUS = "MISSING"
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
REFERENCE_FILES = {
    "inventory.csv": ["sku_code", "timestamp", "inventory"],
    "payments.csv": ["order_id", "timestamp", "payment_status"],
    "zip_codes.csv": ["zip_code", "available_from"],
}


class ReferenceDataError(ConfigurationError):
    """A reference CSV is missing, lacks a column, or holds a value that cannot be read."""


def parse_timestamps(values: pd.Series, what: str) -> np.ndarray:
    """``YYYY-MM-DD HH:MM:SS`` (UTC) strings -> int64 seconds since the epoch.

    Raises :class:`ReferenceDataError` naming the file line (row index + 2, after the header)
    of the first value that is not in that form."""
    seconds, bad = parse_timestamps_lenient(values)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ReferenceDataError(
            f"{what}: {int(bad.sum())} timestamp(s) not in YYYY-MM-DD HH:MM:SS form, first "
            f"{values.iloc[first]!r} on line {first + 2}")
    return seconds


def parse_timestamps_lenient(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(int64 epoch seconds, bool mask of values that did not parse; their seconds are 0)."""
    parsed = pd.to_datetime(values, format=_TIME_FORMAT, errors="coerce")
    bad = parsed.isna().to_numpy()
    seconds = parsed.fillna(pd.Timestamp(0)).to_numpy("datetime64[s]").astype(np.int64)
    return seconds, bad


def _python_encoding(encoding: str) -> str:
    # A UTF-8 file saved by Excel starts with a byte-order mark, which would otherwise become
    # part of the first column's name.
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def _undecodable_line(path: Path, encoding: str) -> str:
    """Where ``path`` first fails to decode: line, column and byte, for the error message."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as exc:
                return (f"line {number}, column {exc.start + 1}: byte "
                        f"0x{raw[exc.start]:02x} is not valid {encoding}")
    return "somewhere in the file"


def read_csv(path: Path, columns: list[str], encoding: str = "utf-8") -> pd.DataFrame:
    """The ``columns`` of the CSV at ``path``, every value as text (leading zeros kept; an
    empty field is ``""``). Extra columns are ignored.

    Raises :class:`ReferenceDataError` naming the file when it is missing, lacks a column, is
    not text in ``encoding`` (with the first bad line and byte), or is not a CSV table.
    """
    if not path.is_file():
        raise ReferenceDataError(f"{path} does not exist")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False,
                            encoding=_python_encoding(encoding))
    except UnicodeDecodeError:
        raise ReferenceDataError(
            f"{path} is not {encoding} text: {_undecodable_line(path, encoding)}. Save it as "
            "UTF-8, or name its encoding with --encoding (TRIAGE_CSV_ENCODING), e.g. cp1252 "
            "for Excel on Windows") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ReferenceDataError(f"{path} is not a CSV table: {exc}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReferenceDataError(f"{path} lacks column(s) {', '.join(missing)}; "
                                 f"it has {', '.join(frame.columns)}")
    # A row with fewer fields than the header has NaN in the rest, whatever keep_default_na.
    return frame[columns].fillna("")


def check_reference_dir(data_dir: str | Path, encoding: str = "utf-8") -> None:
    """Refuse, once, a reference directory the workers could not load: each CSV must exist,
    have its columns, and be text in ``encoding``. Reads each file once, without parsing it.

    Raises :class:`ReferenceDataError` with the file, and the line of a bad byte."""
    for name, columns in REFERENCE_FILES.items():
        path = Path(data_dir) / name
        if not path.is_file():
            raise ReferenceDataError(f"{path} does not exist (a reference directory holds "
                                     f"{', '.join(REFERENCE_FILES)})")
        try:
            text = path.read_bytes().decode(_python_encoding(encoding))
        except UnicodeDecodeError:
            raise ReferenceDataError(
                f"{path} is not {encoding} text: {_undecodable_line(path, encoding)}. Save it "
                "as UTF-8, or name its encoding with --encoding (TRIAGE_CSV_ENCODING)") from None
        header = next(csv.reader(io.StringIO(text.partition("\n")[0])), [])
        missing = [c for c in columns if c not in header]
        if missing:
            raise ReferenceDataError(f"{path} lacks column(s) {', '.join(missing)}; "
                                     f"it has {', '.join(header)}")


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
    def load(cls, data_dir: str | Path, encoding: str = "utf-8") -> ReferenceTables:
        """Read inventory.csv, payments.csv and zip_codes.csv from ``data_dir``.

        Raises :class:`ReferenceDataError` (a configuration error) for a missing file or
        column, a file not in ``encoding``, or a value that cannot be read."""
        data_dir = Path(data_dir)
        frames = {name: read_csv(data_dir / name, columns, encoding)
                  for name, columns in REFERENCE_FILES.items()}
        return cls.from_frames(frames["inventory.csv"], frames["payments.csv"],
                               frames["zip_codes.csv"])


def zip_code_warnings(reference_zips: Collection[str], order_zips: Iterable[str] = ()
                      ) -> list[str]:
    """Signs that the zip codes of ``zip_codes.csv`` lost their leading zeros (an upstream
    tool wrote them as integers: ``562`` for ``00562``), which silently makes every order to
    such a zip "not served". Empty when nothing looks wrong.

    Two checks: all-digit reference zips of fewer digits than the usual length among them;
    and all-digit order zips that are unknown, but known once their leading zeros are removed.
    """
    warnings = []
    digits = [z for z in reference_zips if z.isdigit()]
    if digits:
        lengths = Counter(len(z) for z in digits)
        usual, count = lengths.most_common(1)[0]
        shorter = sorted(z for z in digits if len(z) < usual)
        if shorter and count >= len(digits) / 2:
            warnings.append(
                f"{len(shorter)} of {len(digits)} numeric zip codes in zip_codes.csv have fewer "
                f"than the usual {usual} digits (e.g. {', '.join(shorter[:3])}): were leading "
                "zeros lost by a tool that wrote them as numbers? Orders to those zips would "
                "be scored as not served")
    matched = truncated_zip_match(reference_zips, order_zips)
    if matched:
        warnings.append(matched)
    return warnings


def truncated_zip_match(reference_zips: Collection[str], order_zips: Iterable[str]
                        ) -> str | None:
    """A warning when an all-digit order zip is not in ``reference_zips`` but is once its
    leading zeros are removed; None otherwise. Costs one lookup per order zip."""
    matched = sorted({z for z in order_zips
                      if z.isdigit() and z not in reference_zips
                      and z.lstrip("0") in reference_zips})
    if not matched:
        return None
    return (f"{len(matched)} order zip code(s) are not in zip_codes.csv but are once their "
            f"leading zeros are removed (e.g. {matched[0]} vs {matched[0].lstrip('0')}): "
            "zip_codes.csv has lost its leading zeros, and such orders are scored as not served")
