"""Reference data: the reference streams' state (model/streams.py: inventory, payments, zip
codes), with a vectorised as-of lookup.

Loaded from the users' CSVs (the snapshot), or from nothing, and kept up to date by the live
reference streams; every lookup is numpy over a whole batch, with no pandas and no per-order
Python objects. ``pandas.merge_asof(direction="backward")`` is the oracle this must agree with,
row for row, ties included (the test suite checks it). The tables are
:class:`~triage.model.asof.VersionedTable` s.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections import Counter
from collections.abc import Collection, Iterable, KeysView, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pandas reads the CSVs, imported then: a worker on live data never needs it
    import pandas as pd

from triage.bus.errors import ConfigurationError
from triage.model.asof import TIME_MAX, TIME_MIN, VersionedTable, Vocabulary
from triage.model.streams import REFERENCE_STREAMS, ReferenceStream, by_name

MISSING_STATUS = "MISSING"
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
#: The snapshot's files and the columns read from each (model/streams.py).
REFERENCE_FILES = {s.csv_file: s.csv_columns for s in REFERENCE_STREAMS}


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
    import pandas as pd

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
    import pandas as pd

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


def table_times_ms(seconds: np.ndarray, file: str, column: str) -> np.ndarray:
    """int64 UTC seconds read from ``file``'s ``column`` -> milliseconds, the tables' unit.

    Raises :class:`ReferenceDataError` naming the file line (row index + 2, after the header) of
    the first time the tables cannot hold (before 1900 or from 2400 on, model/asof.py): a
    "forever" date such as 9999-12-31 among them, for which leaving the row out means the same
    to every order before 2400 (an unknown zip is not served)."""
    times = np.asarray(seconds, dtype=np.int64) * 1000
    bad = (times < TIME_MIN) | (times >= TIME_MAX)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        moment = np.datetime64(int(seconds[first]), "s")
        raise ReferenceDataError(
            f"{file}: {int(bad.sum())} {column} value(s) outside the times the tables hold "
            f"(1900-01-01 to 2399-12-31), first {moment} on line {first + 2}; a 'never' date "
            "such as 9999-12-31 is best left out (an unknown zip is not served)")
    return times


class ReferenceTables:
    """The reference streams' state (model/streams.py): one
    :class:`~triage.model.asof.VersionedTable` per declared stream, for a whole batch at once
    (``pandas.merge_asof(direction="backward")``, ties to the last applied). Built from the CSV
    snapshot (``load``), from nothing (``empty``), and kept up to date by the live reference
    streams (scoring/feed.py): every table grows by batches, the live events after the
    snapshot's rows, so a live event wins a tie with a CSV row.

    Times are int64 UTC milliseconds: a CSV row's whole second times 1,000, a live event's own.
    A ``category`` stream's values are codes of its :class:`~triage.model.asof.Vocabulary`
    (``vocabularies[name]``, code 0 its ``missing`` label).
    """

    def __init__(self, streams: Sequence[ReferenceStream] = REFERENCE_STREAMS,
                 tables: Mapping[str, VersionedTable[Any]] | None = None,
                 vocabularies: Mapping[str, Vocabulary] | None = None) -> None:
        self.streams = by_name(streams)
        self.tables: dict[str, VersionedTable[Any]] = dict(tables) if tables else {
            s.name: VersionedTable(_DTYPES[s.kind]) for s in streams}
        self.vocabularies: dict[str, Vocabulary] = dict(vocabularies) if vocabularies else {
            s.name: Vocabulary() for s in streams if s.kind == "category"}

    @classmethod
    def empty(cls, streams: Sequence[ReferenceStream] = REFERENCE_STREAMS) -> ReferenceTables:
        """Tables with no record yet: the live path without a CSV snapshot."""
        return cls(streams)

    @classmethod
    def from_frames(cls, frames: Mapping[str, pd.DataFrame],
                    streams: Sequence[ReferenceStream] = REFERENCE_STREAMS) -> ReferenceTables:
        """Tables from each stream's CSV columns (text), ``frames``: stream name -> frame. Rows
        of a file are applied in file order, so of two rows with the same key and second the
        later one wins, as in merge_asof.

        Raises :class:`ReferenceDataError` naming the file and line of a value that cannot be
        read or held (a time before 1900 or from 2400 on, a non-numeric number)."""
        tables = cls(streams)
        for stream in streams:
            frame = frames[stream.name]
            what = f"{stream.csv_file} {stream.csv_time}"
            times = table_times_ms(parse_timestamps(frame[stream.csv_time], what),
                                   stream.csv_file, stream.csv_time)
            column = frame[stream.value].tolist() if stream.value else None
            try:
                values = tables.encode(stream.name, column, len(frame))
            except ValueError as exc:
                raise ReferenceDataError(f"{stream.csv_file}: non-numeric {stream.value} "
                                         f"({exc})") from None
            tables.tables[stream.name] = VersionedTable.from_records(
                frame[stream.key].tolist(), times, values)
        return tables

    @classmethod
    def load(cls, data_dir: str | Path, encoding: str = "utf-8",
             streams: Sequence[ReferenceStream] = REFERENCE_STREAMS) -> ReferenceTables:
        """Read each stream's ``csv_file`` (inventory.csv, payments.csv, zip_codes.csv) from
        ``data_dir``.

        Raises :class:`ReferenceDataError` (a configuration error) for a missing file or
        column, a file not in ``encoding``, or a value that cannot be read."""
        data_dir = Path(data_dir)
        return cls.from_frames({s.name: read_csv(data_dir / s.csv_file, s.csv_columns, encoding)
                                for s in streams}, streams)

    # -- updates -----------------------------------------------------------------------------

    def encode(self, stream: str, values: Sequence[Any] | None, count: int) -> np.ndarray:
        """``count`` values of ``stream`` as its table holds them: float64 for a number, int32
        vocabulary codes for a category, int8 ones for presence (``values`` None). Raises
        ValueError for a number that is not one."""
        kind = self.streams[stream].kind
        if kind == "presence":
            return np.ones(count, dtype=np.int8)
        assert values is not None
        if kind == "number":
            return np.asarray(values, dtype=np.float64)
        return self.vocabularies[stream].encode(values).astype(np.int32)

    def insert(self, stream: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Add decoded event records of ``stream`` (its ``key``, ``time`` in UTC ms and
        ``value`` fields) as new versions. Raises ValueError, TypeError or OverflowError for a
        value the table cannot hold (nothing of the batch is added then)."""
        spec = self.streams[stream]
        times = np.fromiter((r[spec.time] for r in records), np.int64, len(records))
        values = self.encode(stream, [r[spec.value] for r in records] if spec.value else None,
                             len(records))
        self.tables[stream].insert([r[spec.key] for r in records], times, values)

    def retain(self, horizon_ms: int) -> None:
        """Trim every table to ``horizon_ms`` of event time (TRIAGE_REFERENCE_RETENTION)."""
        for table in self.tables.values():
            table.retain(horizon_ms)

    # -- lookups, for a batch ---------------------------------------------------------------

    def as_of(self, stream: str, keys: Sequence[str], times_ms: np.ndarray) -> np.ndarray:
        """The latest value of each key of ``stream`` at or before ``times_ms`` (int64 UTC
        ms), one per key: float64 (NaN when none) for a number, an object array of labels
        (``missing`` when none) for a category, bool (the key has a version) for presence."""
        values, found = self.tables[stream].lookup(keys, times_ms)
        kind = self.streams[stream].kind
        if kind == "number":
            return np.where(found, values, np.nan)
        if kind == "category":
            return self.vocabularies[stream].decode(values)
        return np.asarray(found, dtype=bool)

    def keys(self, stream: str) -> KeysView[str]:
        """Every key of ``stream`` with a version."""
        return self.tables[stream].keys()

    @property
    def size(self) -> int:
        """Records held in all tables."""
        return sum(len(t) for t in self.tables.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the tables' arrays (the key strings come on top)."""
        return sum(t.nbytes for t in self.tables.values())


_DTYPES: dict[str, type[np.generic]] = {"number": np.float64, "category": np.int32,
                                        "presence": np.int8}


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
