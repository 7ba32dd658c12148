"""Figures for ``model.asof.VersionedTable`` on generated data: by hand, not part of the test suite.

    python -m bench.asof_table [--rows 1000000] [--batch 500]

Generates an order history (``model.datagen``: 3,000 SKUs with Zipf-like popularity) large
enough for ``--rows`` inventory records, then prints: inserting them in batches of ``--batch``
in time order and in a random arrival order (total, mean and worst call), looking up a batch of
``--batch`` orders, ``nbytes``, building the table in one call, and a save/load round trip, each
the best of a few runs. The static ``model.reference.AsOfTable`` is timed beside it for
comparison.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from model.asof import VersionedTable
from model.datagen import generate
from model.reference import AsOfTable, parse_timestamps

# model.datagen writes about one stock count per SKU and day plus 0.3 per order: 3,000 SKUs
# over a week give some 20,000 records.
_RECORDS_PER_WEEK = 20_000


def _best(fn: Callable[[], object], repeat: int) -> float:
    """Best of ``repeat`` runs of ``fn``, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _insert_in_batches(keys: list[str], times: np.ndarray, values: np.ndarray,
                       batch: int) -> tuple[VersionedTable[np.float64], np.ndarray]:
    table = VersionedTable(np.float64)
    calls = []
    for start in range(0, len(keys), batch):
        stop = start + batch
        began = time.perf_counter()
        table.insert(keys[start:stop], times[start:stop], values[start:stop])
        calls.append(time.perf_counter() - began)
    return table, np.array(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        generate(max(1, args.rows // 2), 1, data, weeks=max(4, -(-args.rows // _RECORDS_PER_WEEK)))
        inventory = pd.read_csv(data / "inventory.csv", dtype=str, nrows=args.rows)
        orders = pd.read_csv(data / "orders.csv", dtype=str)
    keys_array = inventory["sku_code"].to_numpy(dtype=object)
    keys: list[str] = keys_array.tolist()
    times = parse_timestamps(inventory["timestamp"], "inventory.csv timestamp")
    values = inventory["inventory"].astype(np.float64).to_numpy()
    rng = np.random.default_rng(0)
    sample = rng.choice(len(orders), args.batch, replace=False)
    order_skus: list[str] = orders["sku_code"].to_numpy(dtype=object)[sample].tolist()
    order_times = parse_timestamps(orders["timestamp"].iloc[sample], "orders.csv timestamp")
    print(f"{len(keys):,} inventory records over {len(set(keys)):,} SKUs; batches of "
          f"{args.batch}")

    for name, order in (("time order", np.arange(len(keys))),
                        ("random order", rng.permutation(len(keys)))):
        arrival = [keys[i] for i in order]
        # The best of three runs: the machine may be busy with other work.
        table, calls = min((_insert_in_batches(arrival, times[order], values[order], args.batch)
                            for _ in range(3)), key=lambda run: run[1].sum())
        print(f"insert, {name}: {calls.sum():.2f} s in {len(calls):,} calls; per call mean "
              f"{calls.mean() * 1e6:,.0f} us, p99 {np.quantile(calls, 0.99) * 1e6:,.0f} us, "
              f"max {calls.max() * 1e3:.1f} ms")
    lookup = _best(lambda: table.lookup(order_skus, order_times), 200)
    print(f"lookup of {args.batch} orders after those inserts: {lookup * 1e6:,.0f} us "
          f"({sum(1 for positions, _ in table._levels if len(positions))} runs)")
    print(f"held: {len(table):,} records, nbytes {table.nbytes / 2**20:.1f} MiB")

    build = _best(lambda: VersionedTable.from_records(keys_array, times, values), 3)
    static = _best(lambda: AsOfTable.build(keys_array, times, values), 3)
    print(f"bulk build: {build:.2f} s (static AsOfTable.build: {static:.2f} s)")
    built = VersionedTable.from_records(keys_array, times, values)
    lookup = _best(lambda: built.lookup(order_skus, order_times), 200)
    asof = AsOfTable.build(keys_array, times, values)
    static = _best(lambda: asof.values_at(asof.lookup(order_skus, order_times), np.nan), 200)
    print(f"lookup of {args.batch} orders after a bulk build (one run): {lookup * 1e6:,.0f} us "
          f"(static AsOfTable: {static * 1e6:,.0f} us)")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inventory.npz"
        save = _best(lambda: built.save(path), 3)
        load = _best(lambda: VersionedTable.load(path, np.float64), 3)
        print(f"save: {save:.3f} s, load: {load:.3f} s, file {path.stat().st_size / 2**20:.1f} "
              f"MiB")


if __name__ == "__main__":
    main()
