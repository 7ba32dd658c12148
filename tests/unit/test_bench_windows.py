"""bench/windows.py's arithmetic: the stage's figures beside the scorer's, issue 27's targets
and the report's lines (the figures themselves come from `triage bench --windows`)."""

from __future__ import annotations

from triage.bench.windows import windows_lines, windows_results, windows_targets

STAGE = {"orders": 1000, "seconds": 2.0, "orders_per_s": 500.0, "cpu_us_per_order": 90.0,
         "outputs": 2004, "corrections": 4}
RESTORE = {"changelog_records": 5000, "keys": 2000, "bare_read_s": 1.0, "restore_s": 2.5,
           "restore_vs_bare": 2.5, "mib_per_100k_keys": 40.0}


def test_with_against_without_is_the_share_of_cpu_the_scorer_keeps() -> None:
    # The scorer at 30 µs an order, the stage 90 µs more: a CPU-bound machine runs both at
    # 30 / (30 + 90) = 0.25 of the scorer's throughput alone.
    figures = windows_results(STAGE, RESTORE, scorer_orders_per_s=20_000.0,
                              scorer_cpu_s_per_1000=0.030)
    assert figures["scorer_cpu_us_per_order"] == 30.0
    assert figures["with_vs_without"] == 0.25
    assert figures["stage_vs_scorer_orders_per_s"] == 0.025
    targets = windows_targets(figures)
    assert targets["windows_throughput_at_least_0_7_of_without"] == {
        "value": 0.25, "target": 0.7, "met": False}
    assert targets["windows_restore_at_most_3x_bare_read"] == {
        "value": 2.5, "target": 3.0, "met": True}


def test_the_report_names_each_figure_and_its_target() -> None:
    figures = windows_results(STAGE, RESTORE, 20_000.0, 0.030)
    text = "\n".join(windows_lines({"windows": figures, "targets": windows_targets(figures)}))
    assert "1,000 orders in 2.0 s: 500 orders/s, 90 µs of CPU an order (4 corrections)" in text
    assert "CPU-bound: 0.25   target >= 0.7: MISSED" in text
    assert "restore of 2,000 keys (5,000 changelog records): 2.5 s against a bare read's " \
           "1.0 s = 2.5x   target <= 3x: met" in text
    assert "40 MiB per 100k keys" in text
