"""The data of ``triage bench --backtest``'s memory figure (bench/backtest.py), without a broker
or a process: the second directory holds the first's orders 4 times over, times and ids kept,
beside the very same reference CSVs, so a backtest of it differs only in the stream of orders.
tests/integration/test_bench.py runs the whole figure."""

from __future__ import annotations

from pathlib import Path

from triage.bench.backtest import REPEATS, repeated
from triage.consumer import backtest as bt
from triage.model import artifact
from triage.model.datagen import generate


def test_the_repeated_directory_has_the_orders_4_times_and_the_same_reference_csvs(
        tmp_path: Path, model_dir: Path) -> None:
    once, many = tmp_path / "once", tmp_path / "many"
    generate(1_000, 5, once)
    repeated(once, many)

    for name in ("payments.csv", "inventory.csv", "zip_codes.csv"):
        assert (many / name).read_bytes() == (once / name).read_bytes(), name
    header, *rows = (once / "orders.csv").read_text().splitlines()
    assert (many / "orders.csv").read_text().splitlines() == [header, *rows * REPEATS]

    model = artifact.load(model_dir)
    results = []
    for data in (once, many):
        tables, batches = bt.data_history(data, batch=700)
        results.append(bt.run(model, None, tables, batches,
                              bt.Backtest(model.version, None, "data", None, None)).as_dict())
    small, large = results
    assert large["orders"] == REPEATS * small["orders"] == REPEATS * 1_000
    # The same orders with the same features: every count is the first run's, 4 times.
    assert large["confusion"]["candidate_vs_policy"] == [
        [REPEATS * n for n in row] for row in small["confusion"]["candidate_vs_policy"]]
    assert (large["first_order_ms"], large["last_order_ms"]) == (small["first_order_ms"],
                                                                 small["last_order_ms"])


def test_a_directory_made_again_replaces_its_files(tmp_path: Path) -> None:
    once, many = tmp_path / "once", tmp_path / "many"
    generate(200, 5, once)
    repeated(once, many, times=2)
    repeated(once, many, times=3)
    rows = (once / "orders.csv").read_text().splitlines()[1:]
    assert len((many / "orders.csv").read_text().splitlines()) == 1 + 3 * len(rows)
