"""An incremental as-of table: per string key, a history of (event time, value) records that
grows by small batches and answers "latest value at or before t" for a whole batch at once.

The definition is ``pandas.merge_asof(direction="backward")`` (the features of
``model/features.py``): for an order at time ``t`` and key ``k``, the answer is the value of the
record of key ``k`` with the greatest time ``<= t``; none if there is no such record. **Ties**:
among records with the same key and the same time, the one inserted *last* wins, across insert
calls too. That is what merge_asof gives over all rows in insertion order, stably sorted by
time; and it is how Kafka Streams' versioned stores treat a put at an existing (key,
timestamp), after which this class is named. A record so replaced can never be an answer, so it
is not kept: the table holds one value per distinct (key, time).

Times are int64 **milliseconds** since the epoch, UTC (a CSV row's whole second is a multiple
of 1,000; a live event keeps its own milliseconds), and must lie in ``[TIME_MIN, TIME_MAX)``,
i.e. from 1900-01-01 00:00:00 to 2400-01-01 00:00:00 (exclusive). Lookups accept any int64
time and are exact for all of them (nothing is held before ``TIME_MIN``; everything is at or
before ``TIME_MAX - 1``). Keys are arbitrary ``str``, as many as memory holds; a key, once
seen, stays for the life of the table.

Layout: each record sits on one int64 axis, ``local_key_id << TIME_BITS | (time - TIME_MIN)``,
so one ``searchsorted`` per run answers a batch. The time offset takes 44 bits (557 years of
milliseconds), which leaves 19 bits for key ids: keys are numbered in order of first
appearance and fall into *shards* of ``SHARD_KEYS`` (524,288) keys, each with runs of its own;
a table of fewer keys has one shard, and a lookup costs one pass per shard its keys are in.
Within a shard, records are held in a few sorted, duplicate-free runs, a leveled LSM tree: level
0 is the newest and smallest, and level i holds at most ``_LEVEL0 * _FANOUT**i`` records before
it is merged into level i + 1. An insert sorts its batch and merges it into level 0, so its cost
depends on the batch and level 0, not on the table; a record is copied ``O(_FANOUT)`` times per
level over its life, about ``log(n / _LEVEL0) / log(_FANOUT)`` levels (three at a million
records). A lookup searches each run; where several answer, the greater position wins, the
newer level on a tie.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, KeysView
from itertools import compress, repeat
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

ScalarT = TypeVar("ScalarT", bound=np.generic)
Int64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
# A sorted run: strictly increasing positions (see the module docstring) and their values.
Run = tuple[Int64Array, npt.NDArray[ScalarT]]

TIME_MIN = -2_208_988_800_000    # 1900-01-01 00:00:00 UTC, in milliseconds since the epoch
TIME_MAX = 13_569_465_600_000    # 2400-01-01 00:00:00 UTC; times must be < TIME_MAX
TIME_BITS = 44               # 2**44 ms > TIME_MAX - TIME_MIN: time offsets fit the low bits
KEY_BITS = 63 - TIME_BITS    # a shard's key ids fill the remaining bits of a non-negative int64
SHARD_KEYS = 2 ** KEY_BITS   # keys per shard
_TIME_MASK = (1 << TIME_BITS) - 1

# Level i is merged into level i + 1 once it holds more than _LEVEL0 * _FANOUT**i records.
_LEVEL0 = 4_096
_FANOUT = 16

_VALUE_KINDS = "biuf"        # bool, signed and unsigned integers, floats

MISSING = "MISSING"          # code 0 of every Vocabulary; equals model.reference.MISSING_STATUS


class _Shard(Generic[ScalarT]):
    """The runs of the records of up to SHARD_KEYS keys, by local key id (module docstring)."""

    def __init__(self, empty: Run[ScalarT]) -> None:
        self.empty = empty
        self.levels: list[Run[ScalarT]] = [empty]  # newest first
        self.held = 0  # distinct positions over all levels

    @property
    def nbytes(self) -> int:
        return sum(positions.nbytes + values.nbytes for positions, values in self.levels)

    def insert(self, positions: Int64Array, values: npt.NDArray[ScalarT]) -> None:
        batch = _sorted_run(positions, values)
        unseen = np.ones(len(batch[0]), dtype=np.bool_)
        for held, _ in self.levels:
            unseen &= ~_contains(held, batch[0])
        self.held += int(np.count_nonzero(unseen))
        levels = self.levels
        levels[0] = _merge([levels[0], batch])
        level = 0
        while len(levels[level][0]) > _LEVEL0 * _FANOUT**level:
            if level + 1 == len(levels):
                levels.append(self.empty)
            levels[level + 1] = _merge([levels[level + 1], levels[level]])
            levels[level] = self.empty
            level += 1

    def lookup(self, queries: Int64Array, local_ids: Int64Array,
               values: npt.NDArray[ScalarT], found: BoolArray, best: Int64Array) -> None:
        """Fill ``values``, ``found`` and ``best`` (the position found, -1: none) for
        ``queries`` (positions to answer at or before) of keys ``local_ids``."""
        # Oldest level first: on an equal position the newer level's record wins.
        for positions, run_values in reversed(self.levels):
            if not len(positions):
                continue
            rows = np.searchsorted(positions, queries, side="right") - 1
            at = positions[np.maximum(rows, 0)]
            hit = (rows >= 0) & ((at >> TIME_BITS) == local_ids) & (at >= best)
            values[hit] = run_values[rows[hit]]
            best[hit] = at[hit]
            found |= hit

    def retain(self, cutoff_offset: int) -> None:
        """Drop records at time offsets below ``cutoff_offset``, except each key's newest."""
        positions, values = _merge(self.levels[::-1])
        old = (positions & _TIME_MASK) < cutoff_offset
        # Within a key, records run in time order, so the old ones come first; keep the last.
        newest_old = old.copy()
        newest_old[:-1] &= ~old[1:] | ((positions[1:] >> TIME_BITS)
                                       != (positions[:-1] >> TIME_BITS))
        keep = ~old | newest_old
        run = (positions[keep], values[keep])
        level = 0
        while len(run[0]) > _LEVEL0 * _FANOUT**level:
            level += 1
        self.levels = [self.empty] * level + [run]
        self.held = len(run[0])


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
        self._shards: list[_Shard[ScalarT]] = []
        self._newest: int | None = None
        self._key_bits = KEY_BITS  # fixed for the table's life (tests make shards smaller)

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
        """The greatest time ever inserted (ms, UTC), or None for a table never given a
        record. Retention keeps it: the newest records are never older than a cutoff."""
        return self._newest

    def __len__(self) -> int:
        """Records held: distinct (key, time) pairs, after retention."""
        return sum(shard.held for shard in self._shards)

    @property
    def nbytes(self) -> int:
        """Bytes held by the table's arrays; the key strings and their dict come on top
        (roughly 100 bytes per distinct key)."""
        return sum(shard.nbytes for shard in self._shards)

    def insert(self, keys: Collection[str], times: npt.ArrayLike,
               values: npt.ArrayLike) -> None:
        """Add a batch of records, in arrival order: ``keys[i]`` had value ``values[i]`` from
        ``times[i]`` on. All three of length n; times int64-compatible integers in milliseconds
        since the epoch, UTC, in ``[TIME_MIN, TIME_MAX)``, in any order, repeats allowed; values
        cast to the table's dtype (``same_kind``: no float into an integer table). A (key, time)
        pair seen before, in this batch or an earlier one, takes the later value.

        Raises ValueError (times out of range, lengths differ) or TypeError (times not integers,
        values not castable); the table is then unchanged. Cost: O(b log n) for a batch of b
        records among n held, plus, amortised, O(_FANOUT) copies of each record per level over
        its life.
        """
        times_ms = _int64_vector(times, "times")
        given = np.asarray(values)
        if given.ndim != 1 or not len(keys) == len(times_ms) == len(given):
            raise ValueError(f"keys, times and values must be 1-D of one length, got "
                             f"{len(keys)}, {len(times_ms)} and shape {given.shape}")
        if not len(times_ms):
            return
        cast = given.astype(self._dtype, casting="same_kind")
        low, high = int(times_ms.min()), int(times_ms.max())
        if low < TIME_MIN or high >= TIME_MAX:
            bad = low if low < TIME_MIN else high
            raise ValueError(f"time {bad} is outside the supported range [{TIME_MIN}, "
                             f"{TIME_MAX}) ms (1900-01-01 to 2400-01-01 UTC)")
        key_ids = self._new_key_ids(keys)
        bits = self._key_bits
        positions = ((key_ids & ((1 << bits) - 1)) << TIME_BITS) | (times_ms - TIME_MIN)
        self._newest = high if self._newest is None else max(self._newest, high)
        shards = key_ids >> bits
        while len(self._shards) <= int(shards.max()):
            self._shards.append(_Shard(self._empty))
        for number, rows in _by_shard(shards):
            self._shards[number].insert(positions[rows], cast[rows])

    def lookup(self, keys: Collection[str], times: npt.ArrayLike
               ) -> tuple[npt.NDArray[ScalarT], BoolArray]:
        """For each i, the value of ``keys[i]`` as of ``times[i]``: that of its record with the
        greatest time ``<= times[i]``, the last inserted on a tie (module docstring).

        ``keys``: n strings; ``times``: n int64 milliseconds since the epoch, UTC, any value.
        Returns ``(values, found)``, both of shape (n,): values of the table's dtype, and bool
        ``found``, False for an unknown key or a time before the key's first record; there
        ``values`` holds 0 (code 0, ``MISSING``, of a :class:`Vocabulary`).
        """
        values, found, _ = self.lookup_with_times(keys, times)
        return values, found

    def lookup_with_times(self, keys: Collection[str], times: npt.ArrayLike
                          ) -> tuple[npt.NDArray[ScalarT], BoolArray, Int64Array]:
        """:meth:`lookup`, and the time (int64 ms) of each record found (``TIME_MIN - 1``
        where none is): to choose between the answers of two tables, the later record wins."""
        times_ms = _int64_vector(times, "times")
        if len(keys) != len(times_ms):
            raise ValueError(f"{len(keys)} keys but {len(times_ms)} times")
        key_ids = self._key_ids(keys)
        # Before TIME_MIN: offset -1, below every record of the key; after: the last ms.
        offsets = np.clip(times_ms, TIME_MIN - 1, TIME_MAX - 1) - TIME_MIN
        bits = self._key_bits
        local_ids = np.where(key_ids >= 0, key_ids & ((1 << bits) - 1), -1)
        queries = (np.maximum(local_ids, 0) << TIME_BITS) + offsets
        values = np.zeros(len(times_ms), dtype=self._dtype)
        found = np.zeros(len(times_ms), dtype=np.bool_)
        best = np.full(len(times_ms), -1, dtype=np.int64)
        if len(self._shards) == 1:  # the usual case: no grouping
            self._shards[0].lookup(queries, local_ids, values, found, best)
        elif self._shards:
            for number, rows in _by_shard(np.where(key_ids >= 0, key_ids >> bits, -1)):
                part_values, part_found = values[rows], found[rows]
                part_best = best[rows]
                self._shards[number].lookup(queries[rows], local_ids[rows], part_values,
                                            part_found, part_best)
                values[rows], found[rows], best[rows] = part_values, part_found, part_best
        record_times = np.where(found, (best & _TIME_MASK) + TIME_MIN, TIME_MIN - 1)
        return values, found, record_times

    def keys(self) -> KeysView[str]:
        """Every key ever inserted, in order of first appearance."""
        return self._index.keys()

    def __contains__(self, key: object) -> bool:
        """Whether any record of ``key`` was ever inserted (retention keeps every key)."""
        return key in self._index

    def retain(self, horizon_ms: int) -> None:
        """Drop the records older than the cutoff ``newest_time - horizon_ms`` (event time,
        never the wall clock), except each key's newest record before the cutoff.

        Lookups at times ``>= cutoff`` answer exactly as before. A lookup at a time ``t <
        cutoff`` either answers as before or, where every record of the key at or before ``t``
        was dropped, now answers ``found=False``: it never returns a different value. Keys stay
        known. Records older than the cutoff may still be inserted afterwards. O(len).
        """
        if horizon_ms < 0:
            raise ValueError(f"horizon_ms must be >= 0, got {horizon_ms}")
        if self._newest is None:
            return
        # A cutoff before TIME_MIN (a horizon longer than the data) makes nothing old.
        cutoff = max(self._newest - horizon_ms - TIME_MIN, 0)
        for shard in self._shards:
            shard.retain(cutoff)

    def _key_ids(self, keys: Collection[str]) -> Int64Array:
        """Key id of each of ``keys``, -1 for a key not seen before."""
        get: Callable[[str, int], int] = self._index.get
        return np.fromiter(map(get, keys, repeat(-1)), dtype=np.int64, count=len(keys))

    def _new_key_ids(self, keys: Collection[str]) -> Int64Array:
        """Key id of each of ``keys``, giving the next ids to keys not seen before."""
        index = self._index
        key_ids = self._key_ids(keys) if index else np.full(len(keys), -1, dtype=np.int64)
        unseen = key_ids < 0
        if unseen.any():
            key_ids[unseen] = np.fromiter(
                (index.setdefault(k, len(index)) for k in compress(keys, unseen.tolist())),
                dtype=np.int64, count=int(np.count_nonzero(unseen)))
        return key_ids


def _by_shard(shards: Int64Array) -> Iterable[tuple[int, Int64Array]]:
    """(shard number, row indices) for each shard number in ``shards`` (-1: none), in
    order."""
    if len(shards) and shards.min() == shards.max():
        if len(shards) and shards[0] >= 0:
            yield int(shards[0]), np.arange(len(shards))
        return
    for number in np.unique(shards[shards >= 0]).tolist():
        yield number, np.flatnonzero(shards == number)


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
