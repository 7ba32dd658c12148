"""Prometheus metrics of the HTTP front door (`triage serve`), served on its own /metrics with
the scoring core's (consumer/metrics.py). docs/operating.md, "Metrics", lists them."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("triage_http_requests_total", "HTTP requests answered, by route and status.",
                   ["method", "route", "status"])
LATENCY = Histogram("triage_http_request_seconds",
                    "Time from a request's arrival to its answer, by route.", ["route"],
                    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
DECISIONS = Counter("triage_http_decisions_total", "Orders scored over HTTP.",
                    ["recommendation"])
REFUSED = Counter("triage_http_refused_orders_total",
                  "Orders refused over HTTP (422), by the validation's reason.", ["reason"])
PUBLISH_ERRORS = Counter("triage_gateway_publish_errors_total",
                         "HTTP decisions or drift samples the broker did not take.")
