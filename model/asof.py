"""An incremental as-of table: per string key, a history of (event time, value) records that
grows by small batches and answers "latest value at or before t" for a whole batch at once.

The definition is ``pandas.merge_asof(direction="backward")`` (DESIGN.md, "Features"): for an
order at time ``t`` and key ``k``, the answer is the value of the record of key ``k`` with the
greatest time ``<= t``; none if there is no such record. **Ties**: among records with the same
key and the same time, the one inserted *last* wins, across insert calls too. That is what
merge_asof gives over all rows in insertion order, stably sorted by time; and it is how Kafka
Streams' versioned stores treat a put at an existing (key, timestamp), after which this class is
named. A record so replaced can never be an answer, so it is not kept: the table holds one value
per distinct (key, time).

Times are int64 seconds since the epoch, UTC, and must lie in ``[TIME_MIN, TIME_MAX)``, i.e.
from 1900-01-01 00:00:00 to 2400-01-01 00:00:00 (exclusive). Lookups accept any int64 time and
are exact for all of them (nothing is held before ``TIME_MIN``; everything is at or before
``TIME_MAX - 1``). Keys are arbitrary ``str``; at most ``MAX_KEYS`` (2**29, about 537 million)
distinct keys per table, and a key, once seen, stays for the life of the table.

Layout: each record sits on one int64 axis, ``key_id << TIME_BITS | (time - TIME_MIN)``, with
key ids given in order of first appearance, so one ``searchsorted`` per run answers a batch. The
records are held in a few sorted, duplicate-free runs, a leveled LSM tree: level 0 is the newest
and smallest, and level i holds at most ``_LEVEL0 * _FANOUT**i`` records before it is merged
into level i + 1. An insert sorts its batch and merges it into level 0, so its cost depends on
the batch and level 0, not on the table; a record is copied ``O(_FANOUT)`` times per level over
its life, about ``log(n / _LEVEL0) / log(_FANOUT)`` levels (three at a million records). A lookup
searches each run; where several answer, the greater position wins, the newer level on a tie.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, KeysView
from itertools import compress, islice, pairwise, repeat
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

ScalarT = TypeVar("ScalarT", bound=np.generic)
Int64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
# A sorted run: strictly increasing positions (see the module docstring) and their values.
Run = tuple[Int64Array, npt.NDArray[ScalarT]]

TIME_MIN = -2_208_988_800    # 1900-01-01 00:00:00 UTC, in seconds since the epoch
TIME_MAX = 13_569_465_600    # 2400-01-01 00:00:00 UTC; times must be < TIME_MAX
TIME_BITS = 34               # 2**34 s > TIME_MAX - TIME_MIN: time offsets fit the low bits
MAX_KEYS = 2 ** (63 - TIME_BITS)  # key ids fill the remaining bits of a non-negative int64
_TIME_MASK = (1 << TIME_BITS) - 1

# Level i is merged into level i + 1 once it holds more than _LEVEL0 * _FANOUT**i records.
_LEVEL0 = 4_096
_FANOUT = 16

_FORMAT = 1                  # version of the .npz layout written by VersionedTable.save
_VALUE_KINDS = "biuf"        # bool, signed and unsigned integers, floats: storable without pickle

MISSING = "MISSING"          # code 0 of every Vocabulary; equals model.reference.MISSING_STATUS


class VersionedTable(Generic[ScalarT]):
    """Per string key, a history of (time, value) records; ``lookup`` answers a batch as
    ``merge_asof(direction="backward")`` over every record inserted so far (module docstring).

    ``dtype`` fixes the values' numpy type for the table's life: e.g. ``np.float64`` for stock
    levels, ``np.int32`` for status codes of a :class:`Vocabulary`. Bool, integer and float
    types only.
    """

    def __init__(self, dtype: type[ScalarT] | np.dtype[ScalarT]) -> None:
        self._dtype: np.dtype[ScalarT] = np.dtype(dtype)
        if self._dtype.kind not in _VALUE_KINDS:
            raise TypeError(f"values must be bool, integer or float, not {self._dtype}")
        self._index: dict[str, int] = {}
        self._empty: Run[ScalarT] = (np.empty(0, dtype=np.int64), np.empty(0, dtype=self._dtype))
        self._levels: list[Run[ScalarT]] = [self._empty]  # newest first
        self._held = 0  # distinct positions over all levels
        self._newest: int | None = None

    @classmethod
    def from_records(cls, keys: Collection[str], times: npt.ArrayLike,
                     values: npt.NDArray[ScalarT]) -> VersionedTable[ScalarT]:
        """A table of ``values.dtype`` holding these records, as if inserted in one batch (the
        CSV snapshot path). Same arguments and errors as :meth:`insert`."""
        table = cls(values.dtype)
        table.insert(keys, times, values)
        return table

    @property
    def dtype(self) -> np.dtype[ScalarT]:
        return self._dtype

    @property
    def newest_time(self) -> int | None:
        """The greatest time ever inserted (seconds, UTC), or None for a table never given a
        record. Retention keeps it: the newest records are never older than a cutoff."""
        return self._newest

    def __len__(self) -> int:
        """Records held: distinct (key, time) pairs, after retention."""
        return self._held

    @property
    def nbytes(self) -> int:
        """Bytes held by the table's arrays; the key strings and their dict come on top
        (roughly 100 bytes per distinct key)."""
        return sum(positions.nbytes + values.nbytes for positions, values in self._levels)

    def insert(self, keys: Collection[str], times: npt.ArrayLike,
               values: npt.ArrayLike) -> None:
        """Add a batch of records, in arrival order: ``keys[i]`` had value ``values[i]`` from
        ``times[i]`` on. All three of length n; times int64-compatible integers in seconds since
        the epoch, UTC, in ``[TIME_MIN, TIME_MAX)``, in any order, repeats allowed; values cast to
        the table's dtype (``same_kind``: no float into an integer table). A (key, time) pair
        seen before, in this batch or an earlier one, takes the later value.

        Raises ValueError (times out of range, lengths differ, more than ``MAX_KEYS`` keys) or
        TypeError (times not integers, values not castable); the table is then unchanged.
        Cost: O(b log n) for a batch of b records among n held, plus, amortised, O(_FANOUT)
        copies of each record per level over its life.
        """
        seconds = _int64_vector(times, "times")
        given = np.asarray(values)
        if given.ndim != 1 or not len(keys) == len(seconds) == len(given):
            raise ValueError(f"keys, times and values must be 1-D of one length, got "
                             f"{len(keys)}, {len(seconds)} and shape {given.shape}")
        if not len(seconds):
            return
        cast = given.astype(self._dtype, casting="same_kind")
        low, high = int(seconds.min()), int(seconds.max())
        if low < TIME_MIN or high >= TIME_MAX:
            bad = low if low < TIME_MIN else high
            raise ValueError(f"time {bad} is outside the supported range [{TIME_MIN}, "
                             f"{TIME_MAX}) seconds (1900-01-01 to 2400-01-01 UTC)")
        batch = _sorted_run((self._new_key_ids(keys) << TIME_BITS) | (seconds - TIME_MIN), cast)
        unseen = np.ones(len(batch[0]), dtype=np.bool_)
        for positions, _ in self._levels:
            unseen &= ~_contains(positions, batch[0])
        self._held += int(np.count_nonzero(unseen))
        self._newest = high if self._newest is None else max(self._newest, high)
        levels = self._levels
        levels[0] = _merge([levels[0], batch])
        level = 0
        while len(levels[level][0]) > _LEVEL0 * _FANOUT**level:
            if level + 1 == len(levels):
                levels.append(self._empty)
            levels[level + 1] = _merge([levels[level + 1], levels[level]])
            levels[level] = self._empty
            level += 1

    def lookup(self, keys: Collection[str], times: npt.ArrayLike
               ) -> tuple[npt.NDArray[ScalarT], BoolArray]:
        """For each i, the value of ``keys[i]`` as of ``times[i]``: that of its record with the
        greatest time ``<= times[i]``, the last inserted on a tie (module docstring).

        ``keys``: n strings; ``times``: n int64 seconds since the epoch, UTC, any value.
        Returns ``(values, found)``, both of shape (n,): values of the table's dtype, and bool
        ``found``, False for an unknown key or a time before the key's first record; there
        ``values`` holds 0 (code 0, ``MISSING``, of a :class:`Vocabulary`).
        """
        values, found, _ = self.lookup_with_times(keys, times)
        return values, found

    def lookup_with_times(self, keys: Collection[str], times: npt.ArrayLike
                          ) -> tuple[npt.NDArray[ScalarT], BoolArray, Int64Array]:
        """:meth:`lookup`, and the time (int64 seconds) of each record found (``TIME_MIN - 1``
        where none is): to choose between the answers of two tables, the later record wins."""
        seconds = _int64_vector(times, "times")
        if len(keys) != len(seconds):
            raise ValueError(f"{len(keys)} keys but {len(seconds)} times")
        key_ids = self._key_ids(keys)
        # Before TIME_MIN: offset -1, below every record of the key; after: the last second.
        offsets = np.clip(seconds, TIME_MIN - 1, TIME_MAX - 1) - TIME_MIN
        queries = (np.maximum(key_ids, 0) << TIME_BITS) + offsets
        values = np.zeros(len(seconds), dtype=self._dtype)
        found = np.zeros(len(seconds), dtype=np.bool_)
        best = np.full(len(seconds), -1, dtype=np.int64)
        # Oldest level first: on an equal position the newer level's record wins.
        for positions, run_values in reversed(self._levels):
            if not len(positions):
                continue
            rows = np.searchsorted(positions, queries, side="right") - 1
            at = positions[np.maximum(rows, 0)]
            hit = (rows >= 0) & ((at >> TIME_BITS) == key_ids) & (at >= best)
            values[hit] = run_values[rows[hit]]
            best[hit] = at[hit]
            found |= hit
        record_times = np.where(found, (best & _TIME_MASK) + TIME_MIN, TIME_MIN - 1)
        return values, found, record_times

    def keys(self) -> KeysView[str]:
        """Every key ever inserted, in order of first appearance."""
        return self._index.keys()

    def __contains__(self, key: object) -> bool:
        """Whether any record of ``key`` was ever inserted (retention keeps every key)."""
        return key in self._index

    def retain(self, horizon_s: int) -> None:
        """Drop the records older than the cutoff ``newest_time - horizon_s`` (event time, never
        the wall clock), except each key's newest record before the cutoff.

        Lookups at times ``>= cutoff`` answer exactly as before. A lookup at a time ``t <
        cutoff`` either answers as before or, where every record of the key at or before ``t``
        was dropped, now answers ``found=False``: it never returns a different value. Keys stay
        known. Records older than the cutoff may still be inserted afterwards. O(len).
        """
        if horizon_s < 0:
            raise ValueError(f"horizon_s must be >= 0, got {horizon_s}")
        if self._newest is None:
            return
        positions, values = _merge(self._levels[::-1])
        # A cutoff before TIME_MIN (a horizon longer than the data) makes nothing old.
        old = (positions & _TIME_MASK) < max(self._newest - horizon_s - TIME_MIN, 0)
        # Within a key, records run in time order, so the old ones come first; keep the last.
        newest_old = old.copy()
        newest_old[:-1] &= ~old[1:] | ((positions[1:] >> TIME_BITS)
                                       != (positions[:-1] >> TIME_BITS))
        keep = ~old | newest_old
        self._install((positions[keep], values[keep]))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the table to ``path`` as an uncompressed .npz (numpy arrays only, no pickle),
        atomically: a crash leaves the previous file or the new one, never a part. Merges the
        table's runs into one first (O(len)); answers do not change."""
        positions, values = self._install(_merge(self._levels[::-1]))
        text = "".join(self._index).encode("utf-8", "surrogatepass")
        bounds = np.zeros(len(self._index) + 1, dtype=np.int64)
        bounds[1:] = np.cumsum([len(k) for k in self._index])
        target = Path(path)
        partial = target.with_name(target.name + ".partial")
        with open(partial, "wb") as f:
            np.savez(f, format=np.int64(_FORMAT), positions=positions, values=values,
                     key_text=np.frombuffer(text, dtype=np.uint8),
                     key_bounds=bounds)
        os.replace(partial, target)

    @classmethod
    def load(cls, path: str | os.PathLike[str],
             dtype: type[ScalarT] | np.dtype[ScalarT]) -> VersionedTable[ScalarT]:
        """A table written by :meth:`save`, whose values must be of ``dtype``. Raises
        ValueError for a file that is not a consistent saved table, or of another dtype."""
        table = cls(dtype)
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} is not a saved VersionedTable: not an .npz file")
        with loaded as data:
            try:
                version = int(data["format"])
                positions, values = data["positions"], data["values"]
                text, bounds = data["key_text"], data["key_bounds"]
            except KeyError as exc:
                raise ValueError(f"{path} is not a saved VersionedTable: no {exc}") from None
        if version != _FORMAT:
            raise ValueError(f"{path} has format {version}; this code reads {_FORMAT}")
        if values.dtype != table.dtype:
            raise ValueError(f"{path} holds {values.dtype} values, not {table.dtype}")
        try:
            keys = _decode_keys(text, bounds)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        table._index = {k: i for i, k in enumerate(keys)}
        if len(table._index) != len(keys) or not _consistent(positions, values, len(keys)):
            raise ValueError(f"{path} is not a consistent VersionedTable")
        table._install((positions, values))
        if len(positions):
            table._newest = int((positions & _TIME_MASK).max()) + TIME_MIN
        return table

    def _key_ids(self, keys: Collection[str]) -> Int64Array:
        """Key id of each of ``keys``, -1 for a key not seen before."""
        get: Callable[[str, int], int] = self._index.get
        return np.fromiter(map(get, keys, repeat(-1)), dtype=np.int64, count=len(keys))

    def _new_key_ids(self, keys: Collection[str]) -> Int64Array:
        """Key id of each of ``keys``, giving the next ids to keys not seen before."""
        index = self._index
        known = len(index)
        key_ids = self._key_ids(keys) if known else np.full(len(keys), -1, dtype=np.int64)
        unseen = key_ids < 0
        if unseen.any():
            key_ids[unseen] = np.fromiter(
                (index.setdefault(k, len(index)) for k in compress(keys, unseen.tolist())),
                dtype=np.int64, count=int(np.count_nonzero(unseen)))
            if len(index) > MAX_KEYS:
                for key in list(islice(index, known, None)):
                    del index[key]
                raise ValueError(f"a table holds at most {MAX_KEYS} distinct keys")
        return key_ids

    def _install(self, run: Run[ScalarT]) -> Run[ScalarT]:
        """Make ``run`` the table's only run, at the first level that has room for it."""
        level = 0
        while len(run[0]) > _LEVEL0 * _FANOUT**level:
            level += 1
        self._levels = [self._empty] * level + [run]
        self._held = len(run[0])
        return run


class Vocabulary:
    """A growing mapping between names (e.g. payment statuses) and int64 codes, for tables
    whose values are categories. Code 0 is ``MISSING``; other names get 1, 2, ... in order of
    first appearance. ``Vocabulary(v.names)`` rebuilds ``v`` with the same codes.
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._codes: dict[str, int] = {MISSING: 0}
        self._names_array: npt.NDArray[np.object_] = np.array([MISSING], dtype=object)
        self.encode(names)

    def __len__(self) -> int:
        return len(self._codes)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name, in code order (``names[0]`` is ``MISSING``)."""
        return tuple(self._codes)

    def encode(self, names: Iterable[str]) -> Int64Array:
        """int64 code of each name, adding the names not seen before."""
        codes = self._codes
        return np.fromiter((codes.setdefault(n, len(codes)) for n in names), dtype=np.int64)

    def decode(self, codes: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.object_]:
        """Object array of the name of each code (IndexError for a code never given)."""
        if len(self._names_array) != len(self._codes):
            self._names_array = np.array(list(self._codes), dtype=object)
        return np.asarray(self._names_array[codes])


def _int64_vector(values: npt.ArrayLike, what: str) -> Int64Array:
    array = np.asarray(values)
    if array.shape == (0,):  # e.g. [], which numpy makes float64
        return np.empty(0, dtype=np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise TypeError(f"{what} must be a 1-D array of integers, got {array.dtype} with shape "
                        f"{array.shape}")
    if array.dtype.kind == "u" and len(array) and int(array.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{what} holds {int(array.max())}, past the int64 range")
    return array.astype(np.int64, copy=False)


def _sorted_run(positions: Int64Array, values: npt.NDArray[ScalarT]) -> Run[ScalarT]:
    """Records in insertion order as a run: sorted stably, so that of equal positions the
    last inserted comes last, and only that one kept."""
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    last = np.ones(len(positions), dtype=np.bool_)
    last[:-1] = positions[1:] != positions[:-1]
    return positions[last], values[order[last]]


def _merge(runs: list[Run[ScalarT]]) -> Run[ScalarT]:
    """Runs, oldest first, as one run; of equal positions the newest run's value is kept.
    Linear: the stable sort (timsort) merges the sorted stretches it finds."""
    filled = [run for run in runs if len(run[0])]
    if len(filled) <= 1:
        return filled[0] if filled else runs[0]
    return _sorted_run(np.concatenate([positions for positions, _ in filled]),
                       np.concatenate([values for _, values in filled]))


def _contains(sorted_positions: Int64Array, positions: Int64Array) -> BoolArray:
    """Which of ``positions`` are in ``sorted_positions``."""
    if not len(sorted_positions):
        return np.zeros(len(positions), dtype=np.bool_)
    rows = np.searchsorted(sorted_positions, positions)
    return np.equal(sorted_positions[np.minimum(rows, len(sorted_positions) - 1)], positions)


def _consistent(positions: npt.NDArray[Any], values: npt.NDArray[Any], n_keys: int) -> bool:
    """Whether loaded arrays are a base run: int64 positions strictly increasing, of known keys
    and in-range times, one value each."""
    if positions.dtype != np.int64 or positions.ndim != 1 or values.shape != positions.shape:
        return False
    if not len(positions):
        return True
    return bool(positions[0] >= 0 and positions[-1] >> TIME_BITS < n_keys
                and (positions & _TIME_MASK).max() < TIME_MAX - TIME_MIN
                and np.all(positions[1:] > positions[:-1]))


def _decode_keys(text: npt.NDArray[Any], bounds: npt.NDArray[Any]) -> list[str]:
    """The keys saved as their concatenated UTF-8 ``text`` and the character ``bounds`` of each
    (n + 1 of them). ValueError if they do not fit together."""
    if (text.dtype != np.uint8 or bounds.dtype != np.int64 or text.ndim != 1 or bounds.ndim != 1
            or not len(bounds) or bounds[0] != 0 or np.any(bounds[1:] < bounds[:-1])):
        raise ValueError("saved keys are not UTF-8 bytes and int64 bounds")
    try:
        joined = text.tobytes().decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise ValueError("saved keys are not UTF-8") from None
    if bounds[-1] != len(joined):
        raise ValueError("saved key bounds do not match the key text")
    return [joined[start:end] for start, end in pairwise(bounds.tolist())]
