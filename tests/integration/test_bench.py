"""``triage bench`` as a smoke run: it completes and its JSON has every figure. No timings are
asserted; the figures belong in docs/benchmarks.md, measured by ``make bench``.

The run uses what ``make bench`` uses, a fresh embedded broker of its own (so the session's
broker is not filled with a benchmark's topics), with a shorter session timeout: on the
embedded broker a group's first join takes half of it, and the run joins nine groups. Sizes are
tiny (2,000 orders, 2,000 orders/s, a restore of 20,000 stock events, backtests of 2,000 and
8,000 generated orders) to keep it near a minute and a half; ``--profile`` samples one more
scorer run with py-spy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import TRIAGE
from triage.bench.procstat import run_measured


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    return {**env, "TRIAGE_STATE_DIR": str(tmp_path / "state"),
            "TRIAGE_SESSION_TIMEOUT_MS": "3000"}


def test_bench_smoke_run_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = subprocess.run(
        [*TRIAGE, "bench", "--orders", "2000", "--json", "--latency-seconds", "1",
         "--rate", "2000", "--saturation-orders", "2000", "--sweep", "500",
         "--restore-records", "20000", "--models", "--http", "--backtest",
         "--backtest-orders", "2000", "--profile", "--out", str(out)],
        env=_env(tmp_path), capture_output=True, text=True, timeout=360, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    figures = json.loads(result.stdout)

    for config in ("passthrough", "scorer", "floor", "per_message"):
        row = figures["throughput"][config]
        for key in ("orders_per_s", "seconds", "peak_rss_mb"):
            assert _number(row[key]) and row[key] > 0, (config, key, row[key])
        # CPU time comes in 10 ms ticks (/proc): 2,000 passthrough orders may take less.
        assert _number(row["cpu_s_per_1000"]) and row["cpu_s_per_1000"] >= 0, (config, row)
        assert row["orders"] == 2000
        assert row["outputs"] >= 2000, (config, row["outputs"])  # every order came out
    assert _number(figures["ratios"]["scorer_vs_passthrough"])
    assert _number(figures["ratios"]["scorer_vs_per_message"])
    for load in ("fixed_load", "saturation", "passthrough_fixed_load"):
        latency = figures["latency_ms"][load]
        assert all(_number(latency[p]) for p in ("p50", "p95", "p99")), latency
        assert latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert latency["cdf"] and latency["orders"] > 0
    assert figures["latency_ms"]["fixed_load"]["orders"] == 2000  # 2000/s for 1 s
    assert figures["latency_ms"]["passthrough_fixed_load"]["orders"] == 2000
    assert figures["latency_ms"]["saturation"]["orders"] == 2000
    assert _number(figures["worker_peak_rss_mb"])
    assert set(figures["cpu_s_per_1000"]) == {"passthrough", "scorer", "floor", "per_message"}
    assert _number(figures["ratios"]["floor_vs_passthrough"])
    # --profile: the scorer's time by stage, from py-spy's samples of a worker
    profile = figures["profile"]
    assert profile["samples"] > 0 and Path(profile["raw"]).stat().st_size > 0, profile
    assert profile["per_order_us"] and all(_number(v) for v in profile["per_order_us"].values())
    assert _number(profile["measured_cpu_us_per_order"])
    assert _number(figures["scaling"]["workers_2_orders_per_s"])
    assert _number(figures["scaling"]["speedup"])
    assert [p["batch_size"] for p in figures["batch_sweep"]] == [500]
    http = figures["http"]  # --http
    for key in ("gateway_batch_orders_per_s", "batch_vs_baseline"):
        assert _number(http[key]) and http[key] > 0, (key, http[key])
    for run in ("gateway_fixed_rate", "baseline_fixed_rate"):
        assert http[run]["p50"] <= http[run]["p99"] <= http[run]["max"], http[run]
    assert http["gateway_saturation"]["requests_per_s"] > 0
    probes = http["gateway_probes_under_max_batches"]  # /healthz, /readyz under 10k batches
    assert probes["p50"] <= probes["p99"] <= probes["max"] and probes["batches"] >= 1, probes
    assert set(figures["targets"]) == {
        "http_p99_at_most_10ms_at_500_per_s", "http_batch_at_least_20x_per_request_baseline",
        "scorer_at_least_0_35_of_passthrough", "scorer_at_least_15x_per_message",
        "p99_at_most_1_3x_passthrough_at_fixed_load", "live_at_least_0_8_of_csv_path_throughput",
        "live_p99_at_most_1_3x_csv_path", "launch_to_first_prediction_at_most_4s",
        "help_at_most_0_5s", "supervisor_rss_at_most_60mb", "worker_rss_at_most_200mb",
        "backtest_from_kafka_at_least_3x_scorer", "backtest_peak_rss_4x_orders_at_most_1_1x"}
    assert _number(figures["ratios"]["p99_vs_passthrough_at_fixed_load"])
    startup, memory = figures["startup"], figures["memory"]
    for key in ("launch_to_first_prediction_s", "group_join_s", "help_s", "produce_s"):
        assert _number(startup[key]) and startup[key] > 0, (key, startup[key])
    assert startup["group_join_s"] < startup["launch_to_first_prediction_s"]
    assert len(startup["runs"]) == 3
    for key in ("supervisor_rss_mb", "worker_rss_mb"):
        assert _number(memory[key]) and memory[key] > 0, (key, memory[key])
    _check_live(figures["live"])
    _check_backtest(figures["backtest"])
    models = figures["models"]  # --models
    for key in ("active_orders_per_s", "with_shadow_orders_per_s", "shadow_throughput_ratio",
                "active_cpu_s_per_1000", "with_shadow_cpu_s_per_1000"):
        assert _number(models[key]) and models[key] > 0, (key, models[key])
    assert models["versions"]["active"] != models["versions"]["shadow"]
    delays = models["promote_to_first_prediction_ms"]
    assert len(delays) == 5 and all(_number(d) and d >= 0 for d in delays), delays
    assert figures["machine"]["cores"] >= 1
    assert _number(figures["throughput"]["scorer"]["broker_cpu_s_per_1000"])  # its own broker
    for name in ("json", "throughput_plot", "latency_plot"):
        assert Path(figures["files"][name]).is_file(), name
    assert json.loads((out / "bench.json").read_text())["ratios"] == figures["ratios"]


def _check_live(live: dict[str, Any]) -> None:
    """The live reference path's figures: throughput, latency and restore."""
    run = live["throughput"]
    for key in ("orders_per_s", "seconds", "cpu_s_per_1000", "peak_rss_mb",
                "csv_path_orders_per_s", "ratio_vs_csv_path"):
        assert _number(run[key]) and run[key] > 0, (key, run[key])
    assert run["orders"] == 2000 and run["outputs"] >= 2000, run
    assert run["reference_records"]["payments"] == run["reference_records"]["inventory"] == 2000
    assert run["reference_records"]["zip_codes"] > 0
    assert isinstance(run["reference_wait_expired"], int)

    latency = live["latency"]
    assert all(_number(latency[p]) for p in ("p50", "p95", "p99")), latency
    assert latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert latency["orders"] == 2000 and latency["cdf"]
    assert _number(latency["csv_path"]["p99"]) and _number(latency["p99_ratio_vs_csv_path"])
    assert isinstance(latency["reference_wait_expired"], int)

    restore = live["restore"]
    assert restore["stock_events"] == 20000
    assert restore["records_restored"] >= 20000  # and the zip codes
    assert 0 < restore["launch_to_restored_s"] <= restore["launch_to_started_s"]
    for key in ("restore_s", "table_mb", "peak_rss_mb", "orders_per_s"):
        assert _number(restore[key]) and restore[key] >= 0, (key, restore[key])


def _check_backtest(backtest: dict[str, Any]) -> None:
    """--backtest: from Kafka (over the orders and what the live run read and published) and
    from the CSVs, against the scorer; the memory runs over N and 4N orders."""
    for source in ("kafka", "data"):
        run = backtest[source]
        assert run["orders"] == 2000, (source, run)
        for key in ("orders_per_s", "seconds", "history_read_s", "scoring_s",
                    "scoring_orders_per_s", "cpu_s", "peak_rss_mb", "process_seconds"):
            assert _number(run[key]) and run[key] > 0, (source, key, run[key])
        assert run["candidate_policy_agreement"] is not None
    # From Kafka every order has the prediction the live run published for it.
    assert backtest["kafka"]["published_orders"] == 2000
    assert backtest["data"]["published_orders"] == 0
    for key in ("scorer_orders_per_s", "kafka_vs_scorer", "kafka_scoring_vs_scorer",
                "data_vs_scorer"):
        assert _number(backtest[key]) and backtest[key] > 0, (key, backtest[key])
    memory = backtest["memory"]
    assert memory["orders"] == 2000 and memory["repeats"] == 4
    assert memory["orders_1x"]["orders"] == 2000 and memory["orders_4x"]["orders"] == 8000
    for run in (memory["orders_1x"], memory["orders_4x"]):
        for key in ("peak_rss_mb", "seconds", "cpu_s", "scoring_orders_per_s"):
            assert _number(run[key]) and run[key] > 0, (key, run)
    for key in ("peak_rss_ratio", "generate_s", "reference_csv_mb"):
        assert _number(memory[key]) and memory[key] > 0, (key, memory[key])


def test_the_peak_rss_of_a_command_run_to_its_end_is_its_own(tmp_path: Path) -> None:
    """bench/procstat.py's run_measured: the kernel's peak RSS of a child counts the memory of
    the process it was forked from until its exec; through the launcher a small command shows
    as small beside a large parent, and a large one as large."""
    parent = bytearray(300 * 2**20)  # 300 MiB in this process, every page touched
    parent[::4096] = b"\1" * len(parent[::4096])
    touch = "x = bytearray({} * 2**20); x[::4096] = b'\\1' * len(x[::4096])"
    small = run_measured([sys.executable, "-c", touch.format(20)], {}, tmp_path / "small.log")
    large = run_measured([sys.executable, "-c", touch.format(400)], {}, tmp_path / "large.log")
    assert small.exit_code == 0 and large.exit_code == 0
    assert small.peak_rss_mb < 300, small  # not this process's pages
    assert large.peak_rss_mb >= 400, large
    assert len(parent) == 300 * 2**20
    failed = run_measured([sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path / "f.log")
    assert failed.exit_code == 3


def test_bench_rejects_bad_options(tmp_path: Path) -> None:
    for flags, named in ((["--orders", "0"], "--orders"),
                         (["--restore-records", "-1"], "--restore-records"),
                         (["--backtest-orders", "0"], "--backtest-orders"),
                         (["--sweep", "10,x"], "--sweep")):
        result = subprocess.run([*TRIAGE, "bench", *flags], env=_env(tmp_path),
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 2 and named in result.stderr, result.stderr
    assert result.returncode == 2 and "--sweep" in result.stderr
