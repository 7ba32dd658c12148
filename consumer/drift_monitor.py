"""The drift monitor: reads the drift topic in its own consumer group, cuts it into tumbling
windows, and compares each window with the model's training baseline (``model.drift``).

Per window it writes one ``DriftReport`` (Avro) to the reports topic, logs ``drift_detected``
for every check that alarms (feature, statistic, threshold, p-values), and sets the latest
scores as Prometheus gauges. Then it commits the window's offsets: a crash before that means
the window is read and reported again (at-least-once; the report's ``window_id`` comes from the
offsets, so a repeat is recognisable).

Windows close after ``drift_window_samples`` samples or ``drift_window_minutes`` minutes of
wall-clock time, whichever comes first; a time window with too few samples reports
``insufficient_data``, which is also how a stalled sampler shows up. Windows span every
partition the monitor owns: run one monitor per group (a second one would split the samples
and report smaller windows).

Windows compare *marginal* distributions: the baseline covers whole days and weeks of training
orders, so a window should too. With the default 5% sampling a window of 1,000 samples spans
20,000 orders; where that is less than a day of traffic, the hour-of-day check compares part
of a daily cycle with a whole one and will alarm. Choose the window (or the sample rate) so a
window spans at least a day, or read the hour check with that in mind.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from confluent_kafka import Consumer, Message, TopicPartition
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter

from triage.bus.clients import make_consumer, make_producer, produce, records_of, source_of
from triage.bus.errors import WaitTimeout
from triage.bus.health import Health, serve
from triage.bus.settings import ConnectionSettings, TopicSettings
from triage.consumer.commit import AtLeastOnce
from triage.consumer.settings import DriftSettings
from triage.model.drift import DRIFT, MIN_BASELINE_ROWS, Reference, WindowResult, evaluate
from triage.model.features import FEATURE_NAMES, FeatureBatch
from triage.schemas.codec import DecodeError, codec_for

_FLUSH_TIMEOUT_S = 30.0
_PROGRESS_S = 10.0  # how often the open window's progress is logged
@dataclass
class _Window:
    """Samples of the open window, column by column (each declared feature, the
    recommendation, when it was scored, the order's own time, the rate it was sampled at, its
    partition), and where each came from."""

    opened_at_ms: int
    opened_mono: float
    features: dict[str, list[Any]] = field(
        default_factory=lambda: {name: [] for name in FEATURE_NAMES})
    recommendations: list[str] = field(default_factory=list)
    scored_at: list[int] = field(default_factory=list)
    order_at: list[int] = field(default_factory=list)
    rates: list[float | None] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    versions: Counter[str] = field(default_factory=Counter)
    offsets: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> first, last
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.recommendations)

    def add(self, msg: Message, sample: dict[str, Any] | None) -> None:
        source = source_of(msg)
        partition, offset = source.partition, source.offset
        first, _ = self.offsets.get(partition, (offset, offset))
        self.offsets[partition] = (first, offset)
        if sample is None:
            self.skipped += 1
            return
        values = sample["features"]
        for name, column in self.features.items():
            column.append(values[name])
        self.recommendations.append(sample["recommendation"])
        self.scored_at.append(sample["scored_at_ms"])
        self.order_at.append(sample["order"]["timestamp_ms"])
        self.rates.append(sample["sample_rate"])
        self.partitions.append(partition)
        self.versions[sample["model_version"]] += 1

    def drop_partitions(self, lost: set[int]) -> None:
        """Forget the samples of partitions this monitor no longer owns: their new owner reads
        them again from the last commit."""
        keep = [i for i, p in enumerate(self.partitions) if p not in lost]
        for column in (*self.features.values(), self.recommendations, self.scored_at,
                       self.order_at, self.rates, self.partitions):
            column[:] = [column[i] for i in keep]
        self.offsets = {p: o for p, o in self.offsets.items() if p not in lost}

    def feature_batch(self) -> FeatureBatch:
        """The window's features as the declared columns (a null is the missing value)."""
        return FeatureBatch.from_values(self.features)

    def window_id(self) -> str:
        text = ",".join(f"{p}:{a}-{b}" for p, (a, b) in sorted(self.offsets.items()))
        return hashlib.sha256(f"{self.opened_at_ms if not text else ''}|{text}".encode()
                              ).hexdigest()[:16]


class DriftMetrics:
    """The latest window's scores as Prometheus gauges, on a registry of this monitor's own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ["check", "feature", "test"]
        self.statistic = Gauge("triage_drift_statistic", "Latest window's test statistic.",
                               labels, registry=registry)
        self.threshold = Gauge("triage_drift_threshold",
                               "Critical value of the statistic at the check's Holm level.",
                               labels, registry=registry)
        self.p_value = Gauge("triage_drift_p_value", "Latest window's p-value.", labels,
                             registry=registry)
        self.adjusted_p_value = Gauge("triage_drift_adjusted_p_value",
                                      "Holm-adjusted p-value; drift when <= alpha.", labels,
                                      registry=registry)
        self.psi = Gauge("triage_drift_psi", "Population stability index (effect size).",
                         labels, registry=registry)
        self.alarm = Gauge("triage_drift_alarm", "1 when the latest window alarmed on the check.",
                           labels, registry=registry)
        self.samples = Gauge("triage_drift_window_samples", "Samples in the latest window.",
                             registry=registry)
        self.open_samples = Gauge("triage_drift_open_window_samples",
                                  "Samples in the window not closed yet.", registry=registry)
        self.closed_at = Gauge("triage_drift_window_closed_timestamp_seconds",
                               "When the latest window closed.", registry=registry)
        self.windows = PromCounter("triage_drift_windows", "Windows reported, by status.",
                                   ["status"], registry=registry)

    def update(self, result: WindowResult, closed_at_ms: int) -> None:
        self.samples.set(result.samples)
        self.closed_at.set(closed_at_ms / 1000.0)
        self.windows.labels(result.status).inc()
        for check in result.checks:
            key = (check.name, check.feature, check.test)
            self.statistic.labels(*key).set(check.statistic)
            self.threshold.labels(*key).set(check.threshold)
            self.p_value.labels(*key).set(check.p_value)
            self.adjusted_p_value.labels(*key).set(check.adjusted_p_value)
            self.psi.labels(*key).set(check.psi)
            self.alarm.labels(*key).set(1.0 if check.verdict == DRIFT else 0.0)


def report_record(result: WindowResult, *, window_id: str, model_version: str,
                  opened_at_ms: int, closed_at_ms: int, scored_at_ms: Sequence[int] = (),
                  order_at_ms: Sequence[int] = (), sample_rates: Sequence[float | None] = (),
                  window_samples: int | None = None, window_minutes: float | None = None,
                  other_model_samples: int = 0, skipped: int = 0) -> dict[str, Any]:
    """The ``DriftReport`` Avro record of one evaluated window.

    ``scored_at_ms`` and ``order_at_ms`` (UTC ms) and ``sample_rates`` (0..1, None when a
    sample did not say) hold one value per sample; the record keeps their span, and each
    distinct rate with its number of samples (in rate order, None last).
    ``window_samples``/``window_minutes``: what closes the monitor's windows (None: not that)."""
    rates = Counter(sample_rates)
    return {
        "window_id": window_id,
        "model_version": model_version,
        "status": result.status,
        "samples": result.samples,
        "min_samples": result.min_samples,
        "alpha": result.alpha,
        "correction": "holm",
        "opened_at_ms": opened_at_ms,
        "closed_at_ms": closed_at_ms,
        "first_scored_at_ms": min(scored_at_ms) if scored_at_ms else None,
        "last_scored_at_ms": max(scored_at_ms) if scored_at_ms else None,
        "other_model_samples": other_model_samples,
        "skipped": skipped,
        "first_order_at_ms": min(order_at_ms) if order_at_ms else None,
        "last_order_at_ms": max(order_at_ms) if order_at_ms else None,
        "sample_rates": [{"rate": rate, "samples": rates[rate]}
                         for rate in sorted(rates, key=lambda r: (r is None, r or 0.0))],
        "window_samples": window_samples,
        "window_minutes": window_minutes,
        "checks": [{
            "name": c.name, "feature": c.feature, "test": c.test, "verdict": c.verdict,
            "samples": c.samples, "statistic": c.statistic,
            "threshold": None if np.isnan(c.threshold) else c.threshold,
            "p_value": c.p_value, "adjusted_p_value": c.adjusted_p_value, "psi": c.psi,
            "reason": c.reason,
            "bins": [{"label": label, "baseline": b, "current": w} for label, b, w
                     in zip(c.labels, c.baseline_shares, c.window_shares, strict=True)],
            "unseen": dict(c.unseen),
        } for c in result.checks],
    }


class DriftMonitor:
    """Reads the drift topic in its consumer group, closes windows and reports them.

    With ``TRIAGE_DRIFT_METRICS_PORT``, serves ``/metrics`` (its own registry), ``/healthz``
    (a turn of its loop within ``health_stall_ms``) and ``/readyz`` (baseline loaded, group
    joined) on ``metrics_addr`` (bus/health.py). Raises OSError if the port is taken."""

    def __init__(self, connection: ConnectionSettings, topics: TopicSettings,
                 drift: DriftSettings, manifest: dict[str, Any], *,
                 metrics_addr: str = "0.0.0.0", health_stall_ms: int = 60_000) -> None:
        self.topics = topics
        self.drift = drift
        self.reference = Reference.from_manifest(manifest)
        self.samples = codec_for(connection, "drift_sample", topics.drift_topic)
        self.reports = codec_for(connection, "drift_report", topics.drift_reports_topic)
        self.consumer = make_consumer(connection, drift.drift_group_id)
        self.producer = make_producer(connection)
        self.metrics = DriftMetrics(CollectorRegistry())
        self.log = structlog.get_logger("drift_monitor")
        self.health = Health(health_stall_ms, ("baseline_loaded", "group_joined"))
        self._server = None
        if drift.drift_metrics_port:
            self._server = serve(drift.drift_metrics_port, self.health, self.metrics.registry,
                                 addr=metrics_addr,
                                 setting="--metrics-port or TRIAGE_DRIFT_METRICS_PORT")
            self.log.info("metrics_serving", port=drift.drift_metrics_port,
                          paths=["/metrics", "/healthz", "/readyz"])
        self.health.met("baseline_loaded")
        self._window = self._new_window()
        self._stop_requested = False
        self.committer = AtLeastOnce(self.producer, self.consumer, self.log)
        self.consumer.subscribe([topics.drift_topic],
                                on_assign=lambda *_: self.health.met("group_joined"),
                                on_revoke=self._on_revoke, on_lost=self._on_revoke)
        if self.reference.rows < MIN_BASELINE_ROWS:
            self.log.warning("small_baseline", rows=self.reference.rows,
                             note=f"fewer than {MIN_BASELINE_ROWS} training rows: the baseline's "
                                  "own noise weighs on every test")
        self.log.info("drift_monitor_started", topic=topics.drift_topic,
                      group=drift.drift_group_id, model_version=self.reference.model_version,
                      window_samples=drift.drift_window_samples,
                      window_minutes=drift.drift_window_minutes,
                      min_samples=drift.drift_min_samples, alpha=drift.drift_alpha)

    @staticmethod
    def _new_window() -> _Window:
        return _Window(opened_at_ms=int(time.time() * 1000), opened_mono=time.monotonic())

    def request_stop(self) -> None:
        """Return from :meth:`run` after the batch in hand (safe from a signal handler). The
        open window is not reported; its samples are read again on the next start."""
        self._stop_requested = True

    def run(self, max_windows: int | None = None, timeout_s: float | None = None
            ) -> list[dict[str, Any]]:
        """Report windows until stopped, or until ``max_windows`` were reported by this call
        (raising TimeoutError if ``timeout_s`` passes first); returns the reports written."""
        written: list[dict[str, Any]] = []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        next_progress = time.monotonic() + _PROGRESS_S
        samples_per_window = self.drift.drift_window_samples
        window_s = self.drift.drift_window_minutes * 60.0
        while not self._stop_requested and (max_windows is None or len(written) < max_windows):
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"{len(written)} of {max_windows} window(s) reported after "
                                   f"{timeout_s:.0f} s; {len(self._window)} sample(s) in the "
                                   "open window")
            timeout = 0.5
            if window_s:
                timeout = max(0.0, min(timeout, self._window.opened_mono + window_s
                                       - time.monotonic()))
            for msg in records_of(self.consumer.consume(500, timeout), self.log):
                try:
                    sample = self.samples.decode(msg.value())
                except DecodeError as exc:
                    self.log.warning("undecodable_sample", error=exc.message,
                                     partition=msg.partition(), offset=msg.offset())
                    sample = None
                self._window.add(msg, sample)
                if samples_per_window and len(self._window) >= samples_per_window:
                    written.append(self._close())
            if window_s and time.monotonic() - self._window.opened_mono >= window_s:
                written.append(self._close())
            self.health.beat()
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + _PROGRESS_S
                self._log_open_window()
        return written

    def _log_open_window(self) -> None:
        """Say how full the open window is and what closes it (a monitor with no report yet
        is otherwise silent); also the ``triage_drift_open_window_samples`` gauge."""
        self.metrics.open_samples.set(len(self._window))
        minutes = self.drift.drift_window_minutes
        self.log.info("window_open", samples=len(self._window),
                      closes_at_samples=self.drift.drift_window_samples or None,
                      closes_in_s=round(self._window.opened_mono + minutes * 60
                                        - time.monotonic(), 1) if minutes else None)

    def _close(self) -> dict[str, Any]:
        """Evaluate the open window, report it, commit it, open the next one."""
        window, self._window = self._window, self._new_window()
        result = evaluate(self.reference, window.feature_batch(),
                          np.array(window.recommendations, dtype=object),
                          alpha=self.drift.drift_alpha,
                          min_samples=self.drift.drift_min_samples)
        closed_at_ms = int(time.time() * 1000)
        version = self.reference.model_version
        record = report_record(
            result, window_id=window.window_id(), model_version=version,
            opened_at_ms=window.opened_at_ms, closed_at_ms=closed_at_ms,
            scored_at_ms=window.scored_at, order_at_ms=window.order_at,
            sample_rates=window.rates,
            window_samples=self.drift.drift_window_samples or None,
            window_minutes=self.drift.drift_window_minutes or None,
            other_model_samples=sum(n for v, n in window.versions.items() if v != version),
            skipped=window.skipped)
        produce(self.producer, self.topics.drift_reports_topic,
                key=record["window_id"].encode(), value=self.reports.encode(record),
                on_delivery=self.committer.on_delivery)
        self.committer.finish(
            [TopicPartition(self.topics.drift_topic, p, last + 1)
             for p, (_, last) in window.offsets.items()])
        self.metrics.update(result, closed_at_ms)
        self._log(result, record)
        return record

    def _log(self, result: WindowResult, record: dict[str, Any]) -> None:
        for check in result.drifted:
            self.log.warning("drift_detected", window_id=record["window_id"],
                             feature=check.feature, check=check.name, test=check.test,
                             statistic=round(check.statistic, 6),
                             threshold=round(check.threshold, 6)
                             if not np.isnan(check.threshold) else None,
                             p_value=check.p_value, adjusted_p_value=check.adjusted_p_value,
                             alpha=result.alpha, psi=round(check.psi, 6), samples=check.samples,
                             unseen=check.unseen or None, reason=check.reason)
        self.log.info("drift_window", window_id=record["window_id"], status=result.status,
                      samples=result.samples, drifted=[c.name for c in result.drifted],
                      skipped=record["skipped"])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._window.drop_partitions({p.partition for p in partitions})

    def close(self) -> None:
        """Leave the group (the open window is read again by the next monitor), stop serving
        metrics."""
        self.consumer.close()
        self.producer.flush(_FLUSH_TIMEOUT_S)
        self.producer.close()  # now, not when a reference cycle is collected
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.log.info("drift_monitor_stopped", open_window_samples=len(self._window))

    def __enter__(self) -> DriftMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
