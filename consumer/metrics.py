"""Prometheus metrics of a scorer worker, served on /metrics (beside /healthz and /readyz,
bus/health.py) when TRIAGE_METRICS_PORT is set. README "Metrics" lists them with their meaning;
deploy/prometheus/ and deploy/grafana/ use them by these names."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

import triage.scoring.metrics  # noqa: F401 - a worker serves the scoring core's metrics too

CONSUMED = Counter("triage_records_consumed_total", "Order records consumed.")
GROUP_STALLS = Counter("triage_group_stalls_total",
                       "Times a worker owning no partition found partitions owned by no member of "
                       "its group, or the group not stable, after 2 x the session timeout "
                       "(consumer/groupwatch.py).")
OWNED_PARTITIONS = Gauge("triage_owned_partitions",
                         "Partitions of the orders topic this worker owns in its consumer group.")
LAG = Gauge("triage_consumer_lag_records",
            "Records behind the end of a partition this worker owns (from its own fetches' high "
            "watermarks; updated once a second).", ["partition"])
MODEL_SWAPS = Counter("triage_model_swaps_total",
                      "Models swapped in between two batches (workers following a registry).")
MODEL_INFO = Gauge("triage_model_info", "1 for the model version this worker scores with.",
                   ["model_version"])
BATCH_SECONDS = Histogram("triage_batch_seconds",
                          "Time to handle a batch, hand its records to the producer and "
                          "commit what became due.",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
