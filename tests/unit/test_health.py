"""/healthz, /readyz and /metrics (bus/health.py) over real HTTP: the Health state on its own,
then real workers (``triage worker``, one process each, as in a Kubernetes pod) on the broker:
not ready before they join their consumer group, ready after, still ready when they own no
partition, and not healthy once their loop is stuck (a hook freezes the loop's thread on
SIGUSR1 while the server's thread goes on).

This half needs no broker and starts no process; tests/integration/test_health.py has the rest."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, Counter

from tests.helpers import get, wait_for
from triage.bus.embedded import free_port
from triage.bus.health import Health, serve
from triage.settings import Settings


def test_health_state_over_http() -> None:
    registry = CollectorRegistry()
    Counter("triage_probe_total", "A metric of this test's registry.", registry=registry).inc()
    health = Health(300, ("model_loaded", "group_joined"))
    port = free_port()
    server = serve(port, health, registry, addr="127.0.0.1")
    try:
        status, body = get(port, "/readyz")
        assert status == 503
        assert json.loads(body) == {"status": "not_ready",
                                    "waiting_for": ["group_joined", "model_loaded"]}
        status, body = get(port, "/healthz")
        assert (status, json.loads(body)["status"]) == (503, "starting")  # no turn yet
        health.met("model_loaded")
        health.met("group_joined")
        assert get(port, "/readyz")[0] == 200
        health.beat()
        assert json.loads(get(port, "/healthz")[1])["status"] == "ok"
        # No beat for longer than the stall limit: not live, whatever else holds.
        wait_for("stalled", lambda: get(port, "/healthz")[0] == 503, timeout_s=10)
        assert json.loads(get(port, "/healthz")[1])["status"] == "stalled"
        health.beat()
        assert get(port, "/healthz")[0] == 200
        assert "triage_probe_total 1.0" in get(port, "/metrics")[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_stall_limit_a_slow_batch_could_reach_is_refused() -> None:
    import pytest

    from triage.bus.settings import SettingsError

    with pytest.raises(SettingsError, match="TRIAGE_HEALTH_STALL_MS"):
        Settings.of(metrics_port=9100, processing_deadline_ms=30_000, delivery_timeout_ms=60_000,
                    health_stall_ms=90_000)
    # Only where the endpoint is served: other commands keep accepting a long deadline.
    assert Settings.of(processing_deadline_ms=100_000, max_poll_interval_ms=300_000)
    assert Settings.of(metrics_port=9100).scorer.health_stall_ms == 120_000
