"""The backtest's figures of ``triage bench --backtest`` (docs/benchmarks.md, "Backtest").

Speed: the backtest of consumer/backtest.py, ``kafka_history`` + ``run``, over the bench's own
orders topic, the live path's reference topics and the predictions the live run published on
them, in a process of its own (``python -m triage.bench.backtest kafka``, started after the
live run and compared with the scorer (b) of the same run); and ``data_history`` + ``run``
over the bench's CSVs (``... data``). Each child times itself from the call that reads the
history to the end of ``run`` (imports and loading the model are not charged), with the
reading of the reference streams and predictions (or the reference CSVs) apart from the
scoring, and writes its figures as JSON.

Memory: ``triage models backtest VERSION --data DIR`` as a user runs it, over N generated
orders and over the same N orders 4 times (orders.csv's rows repeated, times and ids kept) with
the very same reference CSVs (hard links), so that only the stream of orders differs; its peak
RSS is its own (bench/procstat.py's ``run_measured``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from triage.bench.procstat import peak_rss_mb, run_measured

#: The memory figure's second run holds this many times the first run's orders.
REPEATS = 4


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the child process -----------------------------------------------------------------------

def _child(argv: list[str] | None = None) -> int:
    """``python -m triage.bench.backtest kafka|data --model DIR [--data DIR] --out FILE``: one
    backtest of the candidate alone (no active version: one model per order, as the scorer),
    called as ``triage models backtest`` calls it (triage/cli.py ``_backtest``: the workers'
    validator), its figures written to FILE. The settings are the TRIAGE_* environment."""
    parser = argparse.ArgumentParser(prog="python -m triage.bench.backtest")
    parser.add_argument("source", choices=["kafka", "data"])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from triage.consumer import backtest as bt
    from triage.consumer.settings import WorkerSettings
    from triage.model import artifact
    from triage.scoring.validation import OrderValidator

    settings = WorkerSettings.from_env()
    model = artifact.load(args.model)
    result = bt.Backtest(model.version, None, args.source, None, None)
    cpu, started = _cpu_s(), time.monotonic()
    published: Any = lambda batch: None  # noqa: E731
    if args.source == "kafka":
        history = bt.kafka_history(settings)
        tables, batches, published = history.tables, history.batches, history.published
        result.warnings += history.warnings
    else:
        tables, batches = bt.data_history(args.data, encoding=settings.data.csv_encoding)
    read_s = time.monotonic() - started
    bt.run(model, None, tables, batches, result, published=published,
           validator=OrderValidator(settings.validation))
    seconds = time.monotonic() - started
    report = result.as_dict()
    args.out.write_text(json.dumps({
        "orders": result.orders,
        "seconds": round(seconds, 3),
        "orders_per_s": round(result.orders / seconds, 1) if seconds > 0 else None,
        "history_read_s": round(read_s, 3),
        "scoring_s": round(result.elapsed_s, 3),
        "scoring_orders_per_s": report["orders_per_s"],
        "cpu_s": round(_cpu_s() - cpu, 3),
        "peak_rss_mb": round(peak_rss_mb(os.getpid()) or 0.0, 1),
        "candidate_policy_agreement": report["candidate_policy_agreement"],
        "published_orders": report["published_orders"],
        "published_agreement": report["published_agreement"],
        "refused": report["refused"],
        "warnings": report["warnings"],
    }))
    return 0


def child_command(source: str, model_dir: Path, out: Path, data_dir: Path | None = None
                  ) -> list[str]:
    """The command line of one speed run (``source``: kafka or data)."""
    return [sys.executable, "-m", "triage.bench.backtest", source, "--model", str(model_dir),
            *(["--data", str(data_dir)] if data_dir is not None else []), "--out", str(out)]


# -- the memory runs ---------------------------------------------------------------------------

def repeated(source: Path, target: Path, times: int = REPEATS) -> None:
    """``target``: the reference CSVs of ``source`` (hard links where the file system allows,
    else copies: the same bytes) and its orders.csv with the rows ``times`` times over, in the
    same order each time (times and order ids kept), under the one header."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("payments.csv", "inventory.csv", "zip_codes.csv"):
        (target / name).unlink(missing_ok=True)
        try:
            os.link(source / name, target / name)
        except OSError:
            shutil.copyfile(source / name, target / name)
    with open(source / "orders.csv", "rb") as f:
        header = f.readline()
        body_at = f.tell()
    with open(target / "orders.csv", "wb") as out:
        out.write(header)
        for _ in range(times):
            with open(source / "orders.csv", "rb") as f:
                f.seek(body_at)
                shutil.copyfileobj(f, out, 1 << 20)


def memory_runs(triage: list[str], registry: Path, version: str, orders: int, seed: int,
                work: Path, logs: Path, say: Any) -> dict[str, Any]:
    """Generate ``orders`` orders (model/datagen.py, ``seed``) and the ``REPEATS``-times data
    directory beside them, then run ``triage models backtest VERSION --data DIR`` over each, a
    process of its own measured by ``run_measured``. Raises BenchError naming the log if a
    run fails."""
    from triage.bench.runner import BenchError
    from triage.model.datagen import generate

    small, large = work / f"backtest-{orders}", work / f"backtest-{orders}x{REPEATS}"
    started = time.monotonic()
    generate(orders, seed, small)
    generate_s = time.monotonic() - started
    started = time.monotonic()
    repeated(small, large)
    repeat_s = time.monotonic() - started
    say(f"  generated {orders:,} orders in {generate_s:.1f} s, and the {REPEATS}x directory "
        f"({orders * REPEATS:,} orders, the same reference CSVs) in {repeat_s:.1f} s")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    runs = {}
    for name, data in (("orders_1x", small), (f"orders_{REPEATS}x", large)):
        log = logs / f"backtest-memory-{name}.log"
        out = work / f"backtest-reports-{name}"
        ran = run_measured([*triage, "models", "backtest", version, "--registry", str(registry),
                            "--data", str(data), "--out", str(out), "--no-progress"], env, log)
        if ran.exit_code != 0:
            raise BenchError(f"backtest memory run {name}: triage models backtest exited "
                               f"{ran.exit_code}; see {log}")
        report = json.loads(next(out.glob("bt-*.json")).read_text())
        runs[name] = {"orders": report["orders"], "peak_rss_mb": round(ran.peak_rss_mb, 1),
                      "seconds": round(ran.seconds, 2), "cpu_s": round(ran.cpu_s, 2),
                      "scoring_orders_per_s": report["orders_per_s"]}
        say(f"  `triage models backtest --data` over {report['orders']:,} orders: peak RSS "
            f"{ran.peak_rss_mb:.0f} MB, {ran.seconds:.1f} s")
    one, many = runs["orders_1x"], runs[f"orders_{REPEATS}x"]
    return {"orders": orders, "repeats": REPEATS, "generate_s": round(generate_s, 2),
            "repeat_s": round(repeat_s, 2),
            "orders_csv_mb": {name: round((data / "orders.csv").stat().st_size / 2**20, 1)
                              for name, data in (("orders_1x", small),
                                                 (f"orders_{REPEATS}x", large))},
            "reference_csv_mb": round(sum((small / n).stat().st_size for n in (
                "payments.csv", "inventory.csv", "zip_codes.csv")) / 2**20, 1),
            **runs,
            "peak_rss_ratio": round(many["peak_rss_mb"] / one["peak_rss_mb"], 3)}


if __name__ == "__main__":
    sys.exit(_child())
