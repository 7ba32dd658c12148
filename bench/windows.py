"""The feature stage's figures (``triage bench --windows``, issue 27): its throughput over the
bench's orders against the scorer's, the restore of its stores from their changelogs against
a bare consumer reading the same changelogs in the same run, and the memory of its stores per
100,000 keys.

* **Throughput.** One stage instance (consumer/window_stage.py), in the bench's process,
  with all four declared features (two stores), over the bench's orders topic: from its first
  poll until every order has its first answer in both stores, wall seconds and this process's
  CPU seconds. The lateness allowance is 200 ms here (the default 2 s would add 2 s of
  waiting for the last orders, which measures the allowance, not the stage). The scorer's
  figure beside it is (b), the scorer as shipped, of the same run. ``with_vs_without``: the
  throughput of a CPU-bound machine that runs the scorer and the stage, against the scorer
  alone, ``(b's CPU per order) / (b's + the stage's CPU per order)``: what issue 27's "with
  four windowed features against without" costs where CPU is what runs out.
* **Restore.** Every partition of both changelogs, read to its end by a bare consumer
  (``read_changelog``: the records, nothing done with them), then read and restored into
  tasks (``WindowTask.restore``), one after the other in the same run; the ratio of the two
  times. ``keys``: the (order, entity value) entries restored.
* **Memory.** The tasks restored again from the records already read, under tracemalloc:
  the bytes they hold, per 100,000 keys.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from triage.bus.clients import make_admin
from triage.consumer.settings import WorkerSettings
from triage.consumer.window_stage import WindowStage, read_changelog, retention_ms
from triage.model.windows import (
    WINDOWED_FEATURES,
    changelog_topic,
    stores,
    window_topic_specs,
)
from triage.scoring.window_task import WindowTask

BENCH_LATENESS_MS = 200
_TIMEOUT_S = 600.0


def stage_settings(settings: WorkerSettings, orders_topic: str, prefix: str) -> WorkerSettings:
    """The bench's settings for the stage: its topics and group under ``prefix``."""
    return settings.replace(orders_topic=orders_topic, windows_topic_prefix=f"{prefix}-windows",
                            windowed_features_topic=f"{prefix}-windowed_features",
                            windows_group_id=f"{prefix}-windows",
                            reference_lateness_ms=BENCH_LATENESS_MS)


def create_stage_topics(settings: WorkerSettings, partitions: int) -> list[str]:
    """The stage's topics (``partitions`` each, as the orders topic); returns their names.
    Raises KafkaException if the broker refuses one."""
    topics = settings.replace(orders_partitions=partitions).topics
    specs = window_topic_specs(topics, WINDOWED_FEATURES, retention_ms(settings))
    admin = make_admin(settings.connection)
    futures = admin.create_topics([NewTopic(name, count, topics.replication_factor,
                                            config=config)
                                   for name, (count, config) in specs.items()])
    for future in futures.values():
        future.result()
    return list(specs)


def stage_throughput(settings: WorkerSettings, orders: int,
                     say: Callable[[str], None]) -> dict[str, Any]:
    """Run one stage instance over the orders topic until every one of ``orders`` orders has
    its first answer in each store. Raises TimeoutError after ``_TIMEOUT_S``."""
    stage = WindowStage(settings, worker_id="bench")
    expected = orders * len(stage.stores)
    try:
        started = cpu_started = None
        deadline = time.monotonic() + _TIMEOUT_S
        while stage.counts["outputs"] - stage.counts["corrections"] < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stage answered {stage.counts['outputs']:,} of "
                                   f"{expected:,} within {_TIMEOUT_S:.0f} s")
            records = stage.poll(500, 0.1)
            if started is None and records:
                started, cpu_started = time.monotonic(), time.process_time()
            stage.turn(records)
        assert started is not None and cpu_started is not None
        seconds = time.monotonic() - started
        cpu_s = time.process_time() - cpu_started
        counts = dict(stage.counts)
    finally:
        stage.close()
    say(f"  windows: {orders:,} orders through one stage instance in {seconds:.1f} s "
        f"({orders / seconds:,.0f} orders/s, {cpu_s / orders * 1e6:.0f} µs of CPU an order)")
    return {"orders": orders, "seconds": round(seconds, 2),
            "orders_per_s": round(orders / seconds, 1),
            "cpu_us_per_order": round(cpu_s / orders * 1e6, 1),
            "outputs": counts["outputs"], "corrections": counts["corrections"]}


def restore_figures(settings: WorkerSettings, partitions: int,
                    say: Callable[[str], None]) -> dict[str, Any]:
    """Bare read against restore of every changelog partition, and the stores' memory."""
    features = stores(WINDOWED_FEATURES)
    topics = {entity: changelog_topic(settings.topics, entity) for entity in features}
    started = time.monotonic()
    read: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = {
        (entity, p): read_changelog(settings, topic, p)
        for entity, topic in topics.items() for p in range(partitions)}
    bare_s = time.monotonic() - started
    records = sum(map(len, read.values()))
    started = time.monotonic()
    keys = 0
    for entity, topic in topics.items():
        for p in range(partitions):
            task = WindowTask(entity, features[entity], partitions, retention_ms(settings))
            keys += task.restore(read_changelog(settings, topic, p))
    restore_s = time.monotonic() - started
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = []
        for (entity, _), found in read.items():
            task = WindowTask(entity, features[entity], partitions, retention_ms(settings))
            task.restore(found)
            held.append(task)
        bytes_held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    ratio = restore_s / bare_s if bare_s else float("nan")
    per_100k = bytes_held / keys * 100_000 / 2**20 if keys else float("nan")
    say(f"  windows restore: {records:,} changelog records, {keys:,} keys: bare read "
        f"{bare_s:.1f} s, restore {restore_s:.1f} s ({ratio:.1f}x); stores "
        f"{per_100k:.0f} MiB per 100k keys")
    return {"changelog_records": records, "keys": keys, "bare_read_s": round(bare_s, 2),
            "restore_s": round(restore_s, 2), "restore_vs_bare": round(ratio, 2),
            "mib_per_100k_keys": round(per_100k, 1)}


def windows_results(throughput: dict[str, Any], restore: dict[str, Any],
                    scorer_orders_per_s: float, scorer_cpu_s_per_1000: float
                    ) -> dict[str, Any]:
    """The section's results: the stage's figures beside the scorer's (b) of the same run."""
    scorer_us = scorer_cpu_s_per_1000 * 1000.0
    stage_us = throughput["cpu_us_per_order"]
    return {"stage": throughput, "restore": restore,
            "scorer_orders_per_s": round(scorer_orders_per_s, 1),
            "scorer_cpu_us_per_order": round(scorer_us, 1),
            "stage_vs_scorer_orders_per_s": round(throughput["orders_per_s"]
                                                  / scorer_orders_per_s, 3),
            "with_vs_without": round(scorer_us / (scorer_us + stage_us), 3)}


def windows_targets(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 27's targets: with the four windowed features at least 0.7 of the throughput
    without; restore at most 3x a bare consumer reading the same changelog."""
    ratio, restore = figures["with_vs_without"], figures["restore"]["restore_vs_bare"]
    return {"windows_throughput_at_least_0_7_of_without": {
                "value": ratio, "target": 0.7, "met": ratio >= 0.7},
            "windows_restore_at_most_3x_bare_read": {
                "value": restore, "target": 3.0, "met": restore <= 3.0}}


def windows_lines(results: dict[str, Any]) -> list[str]:
    """The section in ``triage bench``'s text report."""
    w, t = results["windows"], results["targets"]
    stage, restore = w["stage"], w["restore"]
    met = ["met" if t[name]["met"] else "MISSED" for name in (
        "windows_throughput_at_least_0_7_of_without", "windows_restore_at_most_3x_bare_read")]
    return [
        "",
        "windowed features (--windows), four features in two stores, one stage instance:",
        f"  {stage['orders']:,} orders in {stage['seconds']:.1f} s: {stage['orders_per_s']:,.0f}"
        f" orders/s, {stage['cpu_us_per_order']:.0f} µs of CPU an order ({stage['corrections']}"
        f" corrections); the scorer (b): {w['scorer_orders_per_s']:,.0f} orders/s, "
        f"{w['scorer_cpu_us_per_order']:.0f} µs an order",
        f"  with the stage against without, CPU-bound: {w['with_vs_without']:.2f}   "
        f"target >= 0.7: {met[0]}",
        f"  restore of {restore['keys']:,} keys ({restore['changelog_records']:,} changelog "
        f"records): {restore['restore_s']:.1f} s against a bare read's "
        f"{restore['bare_read_s']:.1f} s = {restore['restore_vs_bare']:.1f}x   target <= 3x: "
        f"{met[1]}",
        f"  stores: {restore['mib_per_100k_keys']:.0f} MiB per 100k keys (tracemalloc)",
    ]
