"""The incremental as-of table against its oracle: pandas.merge_asof(direction="backward") over
every row inserted so far, in insertion order, stably sorted by time (DESIGN.md, "Features")."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triage.model import asof
from triage.model.asof import TIME_MAX, TIME_MIN, VersionedTable, Vocabulary
from triage.model.reference import MISSING_STATUS

T0 = 1_767_225_600_000  # 2026-01-01 00:00:00 UTC, in ms
KEYS = ["a", "b", "c", "d"]
Row = tuple[str, int, float]
Operation = tuple[str, list[tuple[str, int]]]  # ("insert" or "lookup", [(key, time), ...])


@contextlib.contextmanager
def merge_thresholds(level0: int, fanout: int, key_bits: int = asof.KEY_BITS
                     ) -> Iterator[None]:
    """Small levels, so that a few records already go through every kind of merge; and
    ``2**key_bits`` keys per shard, so that a few keys already span several shards."""
    saved = asof._LEVEL0, asof._FANOUT, asof.KEY_BITS
    asof._LEVEL0, asof._FANOUT, asof.KEY_BITS = level0, fanout, key_bits
    try:
        yield
    finally:
        asof._LEVEL0, asof._FANOUT, asof.KEY_BITS = saved


def oracle(rows: list[Row], keys: list[str], times: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(values, found) by merge_asof over ``rows`` in insertion order."""
    if not rows or not keys:
        return np.zeros(len(keys)), np.zeros(len(keys), dtype=bool)
    right = pd.DataFrame(rows, columns=["key", "time", "value"]).astype({"time": np.int64})
    left = pd.DataFrame({"key": keys, "time": np.array(times, dtype=np.int64),
                         "row": np.arange(len(keys))})
    joined = pd.merge_asof(left.sort_values("time", kind="stable"),
                           right.sort_values("time", kind="stable"),
                           on="time", by="key", direction="backward")
    value = joined.set_index("row")["value"].sort_index().to_numpy()
    found = ~np.isnan(value)
    return np.where(found, value, 0.0), found


def check(table: VersionedTable[np.float64], rows: list[Row], keys: list[str],
          times: list[int]) -> None:
    values, found = table.lookup(keys, np.array(times, dtype=np.int64))
    expected_values, expected_found = oracle(rows, keys, times)
    np.testing.assert_array_equal(found, expected_found)
    np.testing.assert_array_equal(values, expected_values)


TIMES = st.integers(T0, T0 + 12)  # a small range: ties and repeated (key, time) pairs are common
QUERY_TIMES = st.one_of(st.integers(T0 - 2, T0 + 14),
                        st.sampled_from([np.iinfo(np.int64).min, TIME_MIN - 1, TIME_MIN,
                                         TIME_MAX, np.iinfo(np.int64).max]))
BATCHES = st.lists(st.tuples(st.sampled_from(KEYS), TIMES), max_size=12)
LOOKUPS = st.lists(st.tuples(st.sampled_from([*KEYS, "unknown"]), QUERY_TIMES), max_size=10)
OPERATIONS = st.lists(st.one_of(st.tuples(st.just("insert"), BATCHES),
                                st.tuples(st.just("lookup"), LOOKUPS)), max_size=12)
THRESHOLDS = st.sampled_from([(1, 2), (2, 3), (4, 2), (2_048, 16), (1, 2, 0), (2, 3, 1),
                              (2_048, 16, 1)])
EXAMPLES = settings(max_examples=300, deadline=None)


def replay(table: VersionedTable[np.float64], operations: list[Operation],
           rows: list[Row]) -> None:
    """Apply ``operations`` to ``table``, appending what is inserted to ``rows``; each row's
    value is its insertion number, so any wrong pick shows."""
    for kind, batch in operations:
        if kind == "insert":
            new = [(key, time, float(len(rows) + i)) for i, (key, time) in enumerate(batch)]
            rows.extend(new)
            table.insert([r[0] for r in new], np.array([r[1] for r in new], dtype=np.int64),
                         np.array([r[2] for r in new], dtype=np.float64))
        else:
            check(table, rows, [key for key, _ in batch], [time for _, time in batch])


@EXAMPLES
@given(operations=OPERATIONS, thresholds=THRESHOLDS)
def test_every_lookup_equals_merge_asof_over_the_rows_inserted_so_far(
        operations: list[Operation], thresholds: tuple[int, ...]) -> None:
    rows: list[Row] = []
    with merge_thresholds(*thresholds):
        table = VersionedTable(np.float64)
        replay(table, operations, rows)
        check(table, rows, KEYS * 16, [T0 - 1 + t for t in range(16)] * 4)  # all answers
    assert len(table) == len({(key, time) for key, time, _ in rows})
    assert table.newest_time == max((time for _, time, _ in rows), default=None)


@EXAMPLES
@given(operations=OPERATIONS, thresholds=THRESHOLDS, horizon=st.integers(0, 15))
def test_retain_keeps_every_answer_from_the_cutoff_on(
        operations: list[Operation], thresholds: tuple[int, ...], horizon: int) -> None:
    rows: list[Row] = []
    keys = [*KEYS, "unknown"] * 18
    times = np.array([T0 - 2 + t for t in range(18)] * 5, dtype=np.int64)
    with merge_thresholds(*thresholds):
        table = VersionedTable(np.float64)
        replay(table, operations, rows)
        before_values, before_found = table.lookup(keys, times)
        table.retain(horizon)
        after_values, after_found = table.lookup(keys, times)
    if not rows:
        assert len(table) == 0 and table.newest_time is None
        return
    newest = max(time for _, time, _ in rows)
    cutoff = newest - horizon
    assert table.newest_time == newest
    kept = {(key, time) for key, time, _ in rows if time >= cutoff}
    for key in KEYS:
        older = [time for k, time, _ in rows if k == key and time < cutoff]
        kept |= {(key, max(older))} if older else set()
    assert len(table) == len(kept)
    later = times >= cutoff
    np.testing.assert_array_equal(after_found[later], before_found[later])
    np.testing.assert_array_equal(after_values[later], before_values[later])
    # Before the cutoff an answer may only disappear, never change.
    same = after_found & before_found
    np.testing.assert_array_equal(after_values[same], before_values[same])
    assert not (after_found & ~before_found).any()


def value_at(table: VersionedTable[np.float64], key: str, time: int) -> float | None:
    values, found = table.lookup([key], np.array([time]))
    return float(values[0]) if found[0] else None


def fill(table: VersionedTable[np.float64], n: int) -> None:
    """``n`` records of keys the tests do not look up, enough to push older records down."""
    table.insert([f"filler-{i}" for i in range(n)], np.full(n, T0, dtype=np.int64),
                 np.zeros(n))


def test_same_key_and_time_the_last_insert_wins() -> None:
    table = VersionedTable(np.float64)
    table.insert(["a", "a", "a"], np.array([T0, T0, T0 - 5]), np.array([1.0, 2.0, 9.0]))
    assert value_at(table, "a", T0) == 2.0          # within one batch
    table.insert(["a"], np.array([T0]), np.array([3.0]))
    assert value_at(table, "a", T0) == 3.0          # across insert calls
    assert value_at(table, "a", T0 + 100) == 3.0
    assert value_at(table, "a", T0 - 1) == 9.0
    assert len(table) == 2


def test_the_last_insert_wins_across_level_merges() -> None:
    table = VersionedTable(np.float64)
    table.insert(["a"], np.array([T0]), np.array([1.0]))
    fill(table, 3 * asof._LEVEL0)                   # "a" is merged into a lower level
    table.insert(["a"], np.array([T0]), np.array([2.0]))
    assert value_at(table, "a", T0) == 2.0          # the newer level wins
    fill(table, 40 * asof._LEVEL0)                  # and the two records meet in a merge
    assert value_at(table, "a", T0) == 2.0
    assert len(table) == 1 + 40 * asof._LEVEL0      # the second fill replaced the first


def test_times_outside_the_range_raise_and_change_nothing() -> None:
    assert int(datetime(1900, 1, 1, tzinfo=UTC).timestamp()) * 1000 == TIME_MIN
    assert int(datetime(2400, 1, 1, tzinfo=UTC).timestamp()) * 1000 == TIME_MAX
    table = VersionedTable(np.float64)
    for bad in (TIME_MIN - 1, TIME_MAX, np.iinfo(np.int64).max):
        with pytest.raises(ValueError, match="outside the supported range"):
            table.insert(["a", "b"], np.array([T0, bad]), np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="integers"):
        table.insert(["a"], np.array([T0 + 0.5]), np.array([1.0]))
    assert len(table) == 0 and table.newest_time is None
    assert value_at(table, "a", T0) is None
    table.insert(["a", "a"], np.array([TIME_MIN, TIME_MAX - 1]), np.array([1.0, 2.0]))
    assert value_at(table, "a", TIME_MIN - 1) is None
    assert value_at(table, "a", np.iinfo(np.int64).min) is None
    assert value_at(table, "a", TIME_MIN) == 1.0
    assert value_at(table, "a", TIME_MAX - 2) == 1.0
    assert value_at(table, "a", TIME_MAX - 1) == 2.0
    assert value_at(table, "a", np.iinfo(np.int64).max) == 2.0


def test_bad_batches_raise() -> None:
    table = VersionedTable(np.int32)
    with pytest.raises(ValueError, match="one length"):
        table.insert(["a", "b"], np.array([T0]), np.array([1]))
    with pytest.raises(TypeError):
        table.insert(["a"], np.array([T0]), np.array([1.5]))  # no float into an int table
    with pytest.raises(ValueError, match="keys but"):
        table.lookup(["a"], np.array([T0, T0]))
    table.insert([], [], [])  # empty batches, even as lists, are fine
    values, found = table.lookup([], [])
    assert values.dtype == np.int32 and values.shape == found.shape == (0,)
    with pytest.raises(TypeError, match="bool, integer or float"):
        VersionedTable(np.object_)
    assert len(table) == 0


def test_retain_in_event_time() -> None:
    table = VersionedTable(np.float64)
    table.insert(["a", "a", "a", "b", "c"], np.array([T0, T0 + 10, T0 + 50, T0 + 5, T0 + 100]),
                 np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    table.retain(60)  # cutoff T0 + 40: "a" keeps T0 + 10 and T0 + 50, "b" its only record
    assert len(table) == 4 and table.newest_time == T0 + 100
    assert value_at(table, "a", T0 + 40) == 2.0     # at the cutoff: as before
    assert value_at(table, "a", T0 + 10) == 2.0     # before it, the kept record still answers
    assert value_at(table, "a", T0 + 9) is None     # this answer (1.0) is gone
    assert value_at(table, "b", T0 + 5) == 4.0
    with pytest.raises(ValueError, match=">= 0"):
        table.retain(-1)


def random_rows(n: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = [f"k{k}" for k in rng.integers(0, 50, n)]
    return keys, rng.integers(T0, T0 + 200, n), rng.normal(size=n)


def assert_same_answers(left: VersionedTable[np.float64], right: VersionedTable[np.float64],
                        keys: list[str]) -> None:
    assert len(left) == len(right) and left.newest_time == right.newest_time
    grid_keys = [k for k in sorted(set(keys)) for _ in range(203)]
    grid_times = np.tile(np.arange(T0 - 1, T0 + 202), len(set(keys)))
    for got, expected in zip(left.lookup(grid_keys, grid_times),
                             right.lookup(grid_keys, grid_times), strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("batch", [1, 7, 500, 6_000])
@pytest.mark.parametrize("key_bits", [asof.KEY_BITS, 3])
def test_bulk_build_equals_incremental_inserts(batch: int, key_bits: int) -> None:
    """With 3 key bits, 50 keys fall into 7 shards: a batch's rows go to several."""
    keys, times, values = random_rows(6_000, seed=batch)
    with merge_thresholds(16, 4, key_bits):  # five levels
        incremental = VersionedTable(np.float64)
        for start in range(0, len(keys), batch):
            stop = start + batch
            incremental.insert(keys[start:stop], times[start:stop], values[start:stop])
    bulk = VersionedTable.from_records(np.array(keys, dtype=object), times, values)
    assert bulk.dtype == np.float64
    assert_same_answers(incremental, bulk, keys)


def test_nbytes_and_len_follow_the_records() -> None:
    table = VersionedTable(np.float64)
    table.insert(*random_rows(1_000, seed=3))
    assert len(table) <= 1_000 and table.nbytes >= len(table) * 16


def test_vocabulary_codes_statuses_with_missing_as_zero() -> None:
    assert asof.MISSING == MISSING_STATUS
    vocabulary = Vocabulary()
    codes = vocabulary.encode(["OK", "PENDING", "OK", "MISSING", "DECLINED"])
    assert codes.tolist() == [1, 2, 1, 0, 3] and codes.dtype == np.int64
    assert vocabulary.names == ("MISSING", "OK", "PENDING", "DECLINED") and len(vocabulary) == 4
    assert vocabulary.decode(np.array([3, 0, 1])).tolist() == ["DECLINED", "MISSING", "OK"]
    assert vocabulary.encode(["FRAUD_REVIEW"]).tolist() == [4]
    assert vocabulary.decode(np.array([4])).tolist() == ["FRAUD_REVIEW"]  # decode sees growth
    again = Vocabulary(vocabulary.names)
    assert again.names == vocabulary.names
    table = VersionedTable(np.int32)
    table.insert(["o1", "o1"], np.array([T0, T0 + 5]), vocabulary.encode(["PENDING", "OK"]))
    values, found = table.lookup(["o1", "o1", "o2"], np.array([T0 - 1, T0 + 5, T0]))
    assert vocabulary.decode(values).tolist() == ["MISSING", "OK", "MISSING"]
    assert found.tolist() == [False, True, False]
