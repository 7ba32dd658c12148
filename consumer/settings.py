"""The Kafka worker's settings (consumer/): the scorer workers' section, the drift
monitor's and the feature stage's, and :class:`WorkerSettings`, what a worker process reads
from its environment (the command line's Settings, triage/settings.py, is one). The
machinery, and the flat ``TRIAGE_*`` variables, are bus/settings.py's."""

from __future__ import annotations

from dataclasses import dataclass

from triage.bus.settings import SettingsError, at_least_one, check_port, section, setting
from triage.model.settings import DataSettings
from triage.scoring.settings import ScoringSettings


@dataclass(frozen=True)
class ScorerSettings:
    """The scorer workers: their group, batching, delivery, membership and metrics (the
    scoring core's own, sampling, deadline, hooks, are scoring/settings.py's CoreSettings)."""

    group_id: str = setting(
        "triage-scorer", "TRIAGE_GROUP_ID", "Consumer group of the scorer workers.")
    batch_size: int = setting(
        500, "TRIAGE_BATCH_SIZE", "Most orders one worker consumes and scores in one batch.")
    batch_timeout_ms: int = setting(
        100, "TRIAGE_BATCH_TIMEOUT_MS",
        "Longest an idle worker waits for the next order; a batch is then what has been "
        "fetched, up to TRIAGE_BATCH_SIZE.")
    metrics_port: int = setting(
        0, "TRIAGE_METRICS_PORT",
        "Serve /metrics, /healthz and /readyz from each worker on this port + worker number "
        "(`triage worker`, `triage windows`: on this port); 0: off. A `triage windows` beside "
        "`triage consume` on one host needs a port of its own (--metrics-port).")
    delivery_timeout_ms: int = setting(
        60_000, "TRIAGE_DELIVERY_TIMEOUT_MS",
        "Longest a batch waits for the broker to acknowledge what it produced (and, with "
        "--exactly-once, for each attempt to commit its transaction); then the worker exits 1 "
        "and the batch is read again after its restart.")
    health_stall_ms: int = setting(
        120_000, "TRIAGE_HEALTH_STALL_MS",
        "/healthz fails once a worker's loop has not completed a turn (a batch, an idle poll, a "
        "step of its restore) for this long. With a metrics port, more than "
        "TRIAGE_PROCESSING_DEADLINE_MS + TRIAGE_DELIVERY_TIMEOUT_MS, so a slow batch is not "
        "taken for a stuck loop (with --exactly-once, retried commits can take longer).")
    exactly_once: bool = setting(
        False, "TRIAGE_EXACTLY_ONCE",
        "Transactional consume-transform-produce (`--exactly-once`); needs Apache Kafka.")
    instance_id: str = setting(
        "", "TRIAGE_INSTANCE_ID",
        "Static membership (`--instance-id`): the worker's group.instance.id, e.g. the pod "
        "name; worker N of `triage consume` adds `-N`. A worker restarted with the same id "
        "within TRIAGE_SESSION_TIMEOUT_MS gets its partitions back without a rebalance, and "
        "with --exactly-once takes over its transactional id, so a killed worker's open "
        "transaction is aborted at once. Unique per live worker; empty: dynamic membership.")
    transaction_timeout_ms: int = setting(
        10_000, "TRIAGE_TRANSACTION_TIMEOUT_MS",
        "With --exactly-once, the producer's transaction.timeout.ms: a killed worker's open "
        "transaction holds read_committed readers back this long, plus up to the broker's "
        "transaction.abort.timed.out.transaction.cleanup.interval.ms (without "
        "TRIAGE_INSTANCE_ID; with it the restarted worker aborts it at once). Longer than a "
        "batch's produce-and-commit.")

    def __post_init__(self) -> None:
        at_least_one(self, "batch_size", "batch_timeout_ms", "delivery_timeout_ms",
                     "health_stall_ms", "transaction_timeout_ms")
        if self.instance_id and (not self.instance_id.isprintable()
                                 or self.instance_id != self.instance_id.strip()):
            raise SettingsError(f"TRIAGE_INSTANCE_ID={self.instance_id!r} must be printable "
                                "without surrounding white space")


@dataclass(frozen=True)
class DriftSettings:
    """The drift monitor: its group, windows, test level and metrics."""

    drift_group_id: str = setting(
        "triage-drift-monitor", "TRIAGE_DRIFT_GROUP_ID", "Consumer group of the drift monitor.")
    drift_window_samples: int = setting(
        1000, "TRIAGE_DRIFT_WINDOW_SAMPLES",
        "A drift window closes after this many samples; 0: by time only.")
    drift_window_minutes: float = setting(
        0.0, "TRIAGE_DRIFT_WINDOW_MINUTES",
        "A drift window also closes after this many minutes; 0: by sample count only.")
    drift_min_samples: int = setting(
        500, "TRIAGE_DRIFT_MIN_SAMPLES",
        "A window with fewer samples reports `insufficient_data` instead of testing.")
    drift_alpha: float = setting(
        0.01, "TRIAGE_DRIFT_ALPHA",
        "Chance that a window without drift raises any alarm (Holm-corrected over the checks).")
    drift_metrics_port: int = setting(
        0, "TRIAGE_DRIFT_METRICS_PORT",
        "Serve the drift monitor's Prometheus /metrics on this port; 0: off.")

    def __post_init__(self) -> None:
        if self.drift_window_samples < 0 or self.drift_window_minutes < 0 \
                or not (self.drift_window_samples or self.drift_window_minutes):
            raise SettingsError("drift windows need TRIAGE_DRIFT_WINDOW_SAMPLES or "
                                "TRIAGE_DRIFT_WINDOW_MINUTES above 0 (and neither below 0)")
        if self.drift_min_samples < 1:
            raise SettingsError(f"drift_min_samples must be at least 1, "
                                f"got {self.drift_min_samples}")
        if not 0.0 < self.drift_alpha < 1.0:
            raise SettingsError(f"drift_alpha must be within (0, 1), got {self.drift_alpha}")


@dataclass(frozen=True)
class WindowSettings:
    """The feature stage's (``triage windows``, consumer/window_stage.py). It reads the live
    join's TRIAGE_REFERENCE_LATENESS_MS and TRIAGE_MAX_CLOCK_SKEW_MS for its marks."""

    windows_group_id: str = setting(
        "triage-windows", "TRIAGE_WINDOWS_GROUP_ID",
        "Consumer group of the feature stage's instances (`triage windows`).")
    windowed_features: str = setting(
        "", "TRIAGE_WINDOWED_FEATURES",
        "Windowed features the stage computes, names from model/windows.py's "
        "WINDOWED_FEATURES separated by commas; empty: all of them.")
    window_retention_s: int = setting(
        3600, "TRIAGE_WINDOW_RETENTION_S",
        "How far (event time) behind the latest order it answered a store keeps orders, past "
        "their windows, to correct the answers a late order changes and to recognise an "
        "order read again; an order that stands further back is answered `window_expired`. "
        "Covers the lateness of orders and, in a replay at N times real time, N times the "
        "seconds one orders partition may lag another.")

    def __post_init__(self) -> None:
        at_least_one(self, "window_retention_s")

    def names(self) -> list[str]:
        """The names listed, in their order (empty: all declared)."""
        return [n.strip() for n in self.windowed_features.split(",") if n.strip()]


@dataclass(frozen=True)
class WorkerSettings(ScoringSettings):
    """What a scorer worker, the supervisor and the drift monitor read: the scoring sections,
    the worker's, the drift monitor's and the input files'."""

    scorer: ScorerSettings = section(ScorerSettings)
    drift: DriftSettings = section(DriftSettings)
    windows: WindowSettings = section(WindowSettings)
    data: DataSettings = section(DataSettings)

    def check(self) -> None:
        super().check()
        check_port("TRIAGE_METRICS_PORT", self.scorer.metrics_port, off=True)
        check_port("TRIAGE_DRIFT_METRICS_PORT", self.drift.drift_metrics_port, off=True)
        deadline_ms = self.core.processing_deadline_ms
        if 2 * deadline_ms > self.connection.max_poll_interval_ms:
            raise SettingsError(
                f"TRIAGE_PROCESSING_DEADLINE_MS ({deadline_ms}) must be "
                f"at most half of TRIAGE_MAX_POLL_INTERVAL_MS "
                f"({self.connection.max_poll_interval_ms}): a batch that runs past "
                "max.poll.interval.ms gets its worker evicted and is scored again by another, "
                "forever")
        scorer, served = self.scorer, self.scorer.metrics_port or self.drift.drift_metrics_port
        turn_ms = deadline_ms + scorer.delivery_timeout_ms
        if served and scorer.health_stall_ms <= turn_ms:
            raise SettingsError(
                f"TRIAGE_HEALTH_STALL_MS ({scorer.health_stall_ms}) must be more than "
                f"TRIAGE_PROCESSING_DEADLINE_MS + TRIAGE_DELIVERY_TIMEOUT_MS ({turn_ms}): a "
                "batch may take that long (hooks, then the broker's acknowledgements) without "
                "the loop being stuck")
