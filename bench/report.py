"""The benchmark's figures as text for people, and as two PNG plots for docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from triage.bench.windows import windows_lines

_NAMES = {"passthrough": "(a) passthrough (raw bytes, no decoding)",
          "scorer": "(b) scorer as shipped, 1 worker",
          "per_message": "(c) per-message baseline",
          "floor": "(f) floor (codecs, one predict a batch)"}


def _met(target: dict[str, Any]) -> str:
    return "met" if target["met"] else "MISSED"


def _profile_lines(profile: dict[str, Any]) -> list[str]:
    """The scorer's CPU per order by stage (bench/profile.py)."""
    per_order = profile["per_order_us"]
    lines = ["", f"(b) profiled with py-spy ({profile['samples']:,} samples at "
                 f"{profile['rate_hz']} Hz; {profile['raw']}): CPU per order by stage, "
                 f"{profile['measured_cpu_us_per_order']:.1f} µs of worker CPU measured"]
    lines += [f"  {stage:<62}{us:>8.2f} µs" for stage, us in per_order.items()]
    return lines


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def render(results: dict[str, Any]) -> str:
    """Every figure of a run, as the table ``triage bench`` prints."""
    o, m, t = results["options"], results["machine"], results["targets"]
    lines = [
        f"triage bench: {o['orders']:,} orders, {o['partitions']} partitions, batch "
        f"{o['batch_size']} / {o['batch_timeout_ms']} ms, broker: {results['broker']['kind']}",
        f"machine: {m['cpu']}, {m['usable_cores']} cores, {m['memory_gb']} GB, {m['os']}, "
        f"Python {m['python']}; load average before {m['loadavg_before']}, "
        f"after {m['loadavg_after']}",
        *([f"broker started in {results['broker']['start_s']} s; its peak RSS "
           f"{results['broker']['peak_rss_mb']} MB"]
          if results["broker"].get("start_s") is not None else []),
        "",
        f"{'configuration':<42}{'orders/s':>10}{'seconds':>9}{'CPU s/1k':>10}"
        f"{'broker CPU s/1k':>17}{'peak RSS':>10}",
    ]
    for name, row in results["throughput"].items():
        broker = row["broker_cpu_s_per_1000"]
        lines.append(f"{_NAMES[name]:<42}{row['orders_per_s']:>10,.0f}{row['seconds']:>9.2f}"
                     f"{row['cpu_s_per_1000']:>10.3f}"
                     f"{'n/a' if broker is None else f'{broker:.3f}':>17}"
                     f"{row['peak_rss_mb']:>7.0f} MB")
    if o.get("per_message_orders", o["orders"]) < o["orders"]:
        lines.append(f"(c) scored the first {o['per_message_orders']:,} of the orders (at its "
                     "rate, all of them would take minutes)")
    r = results["ratios"]
    lat = results["latency_ms"]
    fixed, sat, floor = lat["fixed_load"], lat["saturation"], lat["passthrough_fixed_load"]
    lines += [
        "",
        f"(b)/(a) = {r['scorer_vs_passthrough']:.2f}   target >= 0.35: "
        f"{_met(t['scorer_at_least_0_35_of_passthrough'])}",
        f"(b)/(c) = {r['scorer_vs_per_message']:.1f}x   target >= 15x: "
        f"{_met(t['scorer_at_least_15x_per_message'])}",
        *([f"CPU per order, (b) against (f) the floor: {r['scorer_cpu_vs_floor']:.2f}x "
           f"({results['cpu_s_per_1000']['scorer'] - results['cpu_s_per_1000']['floor']:.4f} "
           f"s per 1,000 orders added by triage); (f)/(a) = {r['floor_vs_passthrough']:.2f}"]
          if r.get("scorer_cpu_vs_floor") is not None else []),
        "",
        f"end-to-end latency of (b), scored_at - published_at (batch {lat['batch_size']} / "
        f"{lat['batch_timeout_ms']} ms, {lat['partitions']} partitions, after "
        f"{lat['warmup_orders']:,} warm-up orders):",
        f"  fixed load {fixed['offered_per_s']:,.0f} orders/s (achieved "
        f"{fixed['achieved_offered_per_s']:,.0f}/s, {fixed['orders']:,} orders): "
        f"p50 {_ms(fixed['p50'])}, p95 {_ms(fixed['p95'])}, p99 {_ms(fixed['p99'])}",
        f"  (a) passthrough at the same load, on the same broker (the floor): "
        f"p50 {_ms(floor['p50'])}, p95 {_ms(floor['p95'])}, p99 {_ms(floor['p99'])}; p99 "
        f"ratio {r['p99_vs_passthrough_at_fixed_load']}   target <= 1.3: "
        f"{_met(t['p99_at_most_1_3x_passthrough_at_fixed_load'])}",
        f"  saturation, a burst of {sat['orders']:,} offered at {sat['offered_per_s']:,.0f}/s "
        f"and drained at {sat['drained_per_s'] or 0:,.0f}/s (includes waiting in the topic): "
        f"p50 {_ms(sat['p50'])}, p95 {_ms(sat['p95'])}, p99 {_ms(sat['p99'])}",
        "",
        f"worker peak RSS (b), {o['orders']:,} orders: {results['worker_peak_rss_mb']:.0f} MB",
        "CPU seconds per 1,000 orders: " + ", ".join(
            f"{name} {value:.3f}" for name, value in results["cpu_s_per_1000"].items()),
    ]
    lines += _startup_lines(results)
    if results.get("http"):
        lines += _http_lines(results)
    if results.get("timing"):
        lines += _timing_lines(results["timing"])
    if results.get("backtest"):
        lines += _backtest_lines(results)
    if results.get("windows"):
        lines += windows_lines(results)
    if results.get("profile"):
        lines += _profile_lines(results["profile"])
    if results.get("ab"):
        ab = results["ab"]
        lines += ["", f"(b) A/B, {ab['pairs']} interleaved pairs: A {ab['a_module']}, "
                      f"B {ab['b_module']}"]
        for side in ("a", "b"):
            row = ab[side]
            lines.append(f"  {side.upper()}: CPU s/1k {row['cpu_s_per_1000']} (median "
                         f"{row['median_cpu_s_per_1000']:.4f}), orders/s "
                         f"{[round(x) for x in row['orders_per_s']]} (median "
                         f"{row['median_orders_per_s']:,.0f})")
        lines.append(f"  B/A: CPU per order {ab['b_vs_a_cpu']}, orders/s "
                     f"{ab['b_vs_a_orders_per_s']:.3f}")
    scaling = results["scaling"]
    if scaling:
        workers = [k for k in scaling if k.startswith("workers_") and k != "workers_1_orders_per_s"]
        n = workers[0].split("_")[1]
        lines.append(
            f"scaling on {scaling['partitions']} partitions: 1 worker "
            f"{scaling['workers_1_orders_per_s']:,.0f} orders/s, {n} workers "
            f"{scaling[workers[0]]:,.0f} orders/s (x{scaling['speedup']:.2f}; informative "
            f"only when the machine has few cores)")
    lines += _live_lines(results)
    if results.get("models"):
        m = results["models"]
        delays = ", ".join("none" if d is None else f"{d}" for d in
                           m["promote_to_first_prediction_ms"])
        lines += ["", "model registry (--models):",
                  f"  following a registry: {m['active_orders_per_s']:,.0f} orders/s "
                  f"(CPU s/1k {m['active_cpu_s_per_1000']:.3f}); with a shadow version "
                  f"{m['with_shadow_orders_per_s']:,.0f} orders/s (CPU s/1k "
                  f"{m['with_shadow_cpu_s_per_1000']:.3f}) = {m['shadow_throughput_ratio']:.2f}",
                  f"  promote -> first prediction by the new version: {delays} ms"]
    if results["batch_sweep"]:
        lines += ["", f"batch-size sweep ({results['batch_sweep'][0]['orders']:,} orders each):",
                  f"  {'batch':>6}{'passthrough/s':>15}{'scorer/s':>11}{'scorer CPU s/1k':>17}"]
        for point in results["batch_sweep"]:
            lines.append(f"  {point['batch_size']:>6}{point['passthrough_orders_per_s']:>15,.0f}"
                         f"{point['scorer_orders_per_s']:>11,.0f}"
                         f"{point['scorer_cpu_s_per_1000']:>17.3f}")
    if results.get("files"):
        lines += ["", "files: " + ", ".join(str(p) for p in results["files"].values())]
    return "\n".join(lines)


def _startup_lines(results: dict[str, Any]) -> list[str]:
    """Start-up and memory as a user meets them (issue 14's targets)."""
    s, m, t = results["startup"], results["memory"], results["targets"]

    def seconds(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f} s"

    def mb(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f} MB"

    return [
        "",
        f"start-up, `triage consume --workers 1` with one order waiting and reference CSVs of "
        f"{s['reference_orders']:,} orders (median of {len(s['runs'])}):",
        f"  launch -> first prediction {seconds(s['launch_to_first_prediction_s'])}   target "
        f"<= 4 s: {_met(t['launch_to_first_prediction_at_most_4s'])}; of which the group join "
        f"{seconds(s['group_join_s'])}",
        f"  `triage --help` {seconds(s['help_s'])}   target <= 0.5 s: "
        f"{_met(t['help_at_most_0_5s'])}; `triage produce` {seconds(s['produce_s'])}",
        f"  resident memory: supervisor {mb(m['supervisor_rss_mb'])}   target <= 60 MB: "
        f"{_met(t['supervisor_rss_at_most_60mb'])}; worker {mb(m['worker_rss_mb'])}   target "
        f"<= 200 MB: {_met(t['worker_rss_at_most_200mb'])}",
    ]


def _timing_lines(timing: dict[str, Any]) -> list[str]:
    """Corrections under simulated producer timing (--timing)."""
    t = timing["timing"]
    lines = ["", f"late reference producers (--timing), {timing['orders']:,} simulated orders, "
                 f"records up to {t['max_delay_ms']:,} ms late, a pause of up to "
                 f"{t['pause_ms']:,} ms per stream, clocks up to {t['skew_ms']:,} ms ahead:"]
    for allowance, row in timing["by_allowance_ms"].items():
        wait = row["first_prediction_wait_ms"]
        lines.append(
            f"  allowance {int(allowance):,} ms: {row['corrections_per_10000']:,.1f} "
            f"corrections per 10,000 orders ({row['corrected_orders_per_10000']:,.1f} orders), "
            f"{row['flagged_per_10000']:,.1f} flagged; first prediction p50 "
            f"{wait['p50']:,.0f} ms, p99 {wait['p99']:,.0f} ms after publishing")
    return lines


def _backtest_lines(results: dict[str, Any]) -> list[str]:
    """`triage models backtest`'s speed and memory (--backtest)."""
    b, t = results["backtest"], results["targets"]
    kafka, data, memory = b["kafka"], b["data"], b["memory"]
    one, many = memory["orders_1x"], memory[f"orders_{memory['repeats']}x"]
    return [
        "",
        "backtest (--backtest), the candidate alone, a process of its own:",
        f"  from Kafka, {kafka['orders']:,} orders with the live path's reference streams and "
        f"predictions: {kafka['orders_per_s']:,.0f} orders/s ({kafka['history_read_s']:.2f} s "
        f"reading the reference streams and predictions, {kafka['scoring_s']:.2f} s reading and "
        f"scoring the orders: {kafka['scoring_orders_per_s'] or 0:,.0f} orders/s) = "
        f"{b['kafka_vs_scorer']}x the scorer (b)'s {b['scorer_orders_per_s']:,.0f}   target "
        f">= 3x: {_met(t['backtest_from_kafka_at_least_3x_scorer'])}; scoring alone "
        f"{b['kafka_scoring_vs_scorer']}x; agreement with the published predictions "
        f"{_share(kafka['published_agreement'])} of {kafka['published_orders']:,}",
        f"  from the CSVs, {data['orders']:,} orders: {data['orders_per_s']:,.0f} orders/s "
        f"({data['history_read_s']:.2f} s loading the reference CSVs, {data['scoring_s']:.2f} s "
        f"reading and scoring the orders) = {b['data_vs_scorer']}x the scorer",
        f"  `triage models backtest --data`, peak RSS: {one['peak_rss_mb']:.0f} MB over "
        f"{one['orders']:,} orders, {many['peak_rss_mb']:.0f} MB over {many['orders']:,} (the "
        f"same orders {memory['repeats']} times, the same reference CSVs) = "
        f"{memory['peak_rss_ratio']}   target <= 1.10: "
        f"{_met(t['backtest_peak_rss_4x_orders_at_most_1_1x'])}; generated in "
        f"{memory['generate_s']:.1f} s + {memory['repeat_s']:.1f} s",
    ]


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _http_lines(results: dict[str, Any]) -> list[str]:
    """triage serve against the per-request baseline (--http)."""
    h, t = results["http"], results["targets"]
    fixed, sat, base = h["gateway_fixed_rate"], h["gateway_saturation"], h["baseline_saturation"]
    bfixed, probes = h["baseline_fixed_rate"], h["gateway_probes_under_max_batches"]
    return [
        "",
        f"HTTP (--http), one client, keep-alive, {h['orders']:,} exercise-sized orders, no broker:",
        f"  triage serve /decision/v1 at {fixed['offered_per_s']:,.0f}/s: p50 {_ms(fixed['p50'])},"
        f" p99 {_ms(fixed['p99'])}   target p99 <= 10 ms: "
        f"{_met(t['http_p99_at_most_10ms_at_500_per_s'])}; saturation "
        f"{sat['requests_per_s']:,.0f} requests/s (p99 {_ms(sat['p99'])})",
        f"  per-request baseline (one-row DataFrame, predict_proba): at "
        f"{bfixed['offered_per_s']:,.0f}/s p50 {_ms(bfixed['p50'])}, p99 {_ms(bfixed['p99'])}; "
        f"saturation {base['requests_per_s']:,.0f} requests/s",
        f"  batch call: {h['gateway_batch_orders_per_s']:,.0f} orders/s = "
        f"{h['batch_vs_baseline']}x the baseline   target >= 20x: "
        f"{_met(t['http_batch_at_least_20x_per_request_baseline'])}",
        f"  probes ({', '.join(probes['paths'])}) at {probes['offered_per_s']:,.0f}/s while "
        f"{probes['batch_orders']:,}-order batches run back to back: p50 {_ms(probes['p50'])}, "
        f"p99 {_ms(probes['p99'])}, max {_ms(probes['max'])}, {probes['over_probe_timeout']} of "
        f"{probes['probes']} over the kubelet's 5 s ({probes['batches']} batches, "
        f"{probes['batch_p50_s']:.2f} s each at p50)",
    ]


def _live_lines(results: dict[str, Any]) -> list[str]:
    """The live path's figures beside the CSV path's (docs/benchmarks.md, "Live reference
    data")."""
    live, t, o = results["live"], results["targets"], results["options"]
    run, lat, restore = live["throughput"], live["latency"], live["restore"]
    csv = lat["csv_path"]
    refs = ", ".join(f"{name} {n:,}" for name, n in run["reference_records"].items())
    lines = [
        "",
        f"live reference streams (no --reference CSV; lateness "
        f"{o['reference_lateness_ms']:,} ms, max wait {o['reference_max_wait_ms']:,} ms):",
        f"  throughput over the same {run['orders']:,} orders ({refs} reference records): "
        f"{run['orders_per_s']:,.0f} orders/s against {run['csv_path_orders_per_s']:,.0f} on "
        f"the CSV path (b) = {run['ratio_vs_csv_path']:.2f}   target >= 0.8: "
        f"{_met(t['live_at_least_0_8_of_csv_path_throughput'])}; "
        f"CPU s/1k {run['cpu_s_per_1000']:.3f}, peak RSS {run['peak_rss_mb']:.0f} MB, "
        f"reference_wait_expired {run['reference_wait_expired']}",
        f"  latency at {lat['offered_per_s']:,.0f} orders/s (achieved "
        f"{lat['achieved_offered_per_s']:,.0f}/s, {lat['orders']:,} orders, events stamped now): "
        f"p50 {_ms(lat['p50'])}, p95 {_ms(lat['p95'])}, p99 {_ms(lat['p99'])}; CSV path "
        f"p50 {_ms(csv['p50'])}, p95 {_ms(csv['p95'])}, p99 {_ms(csv['p99'])}; p99 ratio "
        f"{'n/a' if lat['p99_ratio_vs_csv_path'] is None else lat['p99_ratio_vs_csv_path']}"
        f"   target <= 1.3: {_met(t['live_p99_at_most_1_3x_csv_path'])}; "
        f"reference_wait_expired {lat['reference_wait_expired']}",
    ]
    if restore:
        lines.append(
            f"  restore of {restore['records_restored']:,} reference records "
            f"({restore['stock_events']:,} stock events + zip codes, {restore['table_mb']:.0f} "
            f"MB of tables): {restore['launch_to_restored_s']:.1f} s from launch "
            f"({restore['restore_s']:.1f} s reading), worker_started at "
            f"{restore['launch_to_started_s']:.1f} s; peak RSS {restore['peak_rss_mb']:.0f} MB "
            f"over a run of the orders ({restore['orders_per_s']:,.0f} orders/s)")
    return lines


def write_plots(results: dict[str, Any], latencies: dict[str, np.ndarray],
                out_dir: Path) -> dict[str, Path]:
    """throughput_vs_batch_size.png and latency_cdf.png; nothing if matplotlib is missing
    (it is a development requirement, not a runtime one)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    files: dict[str, Path] = {}
    title = (f"{results['machine']['cpu']}, {results['machine']['usable_cores']} cores, "
             f"{results['broker']['kind'].split(' (')[0]}")
    sweep = results["batch_sweep"]
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        sizes = [p["batch_size"] for p in sweep]
        ax.plot(sizes, [p["passthrough_orders_per_s"] for p in sweep], "o-",
                label="(a) passthrough")
        ax.plot(sizes, [p["scorer_orders_per_s"] for p in sweep], "s-",
                label="(b) scorer, 1 worker")
        ax.axhline(results["throughput"]["per_message"]["orders_per_s"], color="grey",
                   linestyle="--", label="(c) per-message baseline")
        ax.set_xscale("log")
        ax.set_xlabel("batch size (--batch-size)")
        ax.set_ylabel("orders/s")
        ax.set_title(f"Throughput against batch size ({sweep[0]['orders']:,} orders)\n{title}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        files["throughput_plot"] = out_dir / "throughput_vs_batch_size.png"
        fig.savefig(files["throughput_plot"], dpi=110)
        plt.close(fig)
    lat = results["latency_ms"]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    offered = f"{lat['fixed_load']['offered_per_s']:,.0f} orders/s offered"
    for key, label in (("fixed", f"(b) scorer, fixed load, {offered}"),
                       ("live", "(b) scorer, live reference streams, the same load"),
                       ("passthrough", "(a) passthrough, the same load: the floor"),
                       ("saturation", "(b) scorer, saturation (burst, includes queueing)")):
        values = np.sort(latencies.get(key, np.array([])))
        if len(values):
            ax.plot(np.maximum(values, 0.5), np.arange(1, len(values) + 1) / len(values),
                    label=label)
    ax.axvline(50, color="grey", linestyle=":", label="50 ms")
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency, ms (scored_at - published_at)")
    ax.set_ylabel("share of orders")
    ax.set_title(f"Latency CDF (batch {lat['batch_size']} / {lat['batch_timeout_ms']} ms, "
                 f"{lat['partitions']} partitions)\n{title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    fig.tight_layout()
    files["latency_plot"] = out_dir / "latency_cdf.png"
    fig.savefig(files["latency_plot"], dpi=110)
    plt.close(fig)
    return files
