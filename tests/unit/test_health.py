"""/healthz, /readyz and /metrics (bus/health.py) over real HTTP: the Health state on its own,
then real workers (``triage worker``, one process each, as in a Kubernetes pod) on the broker:
not ready before they join their consumer group, ready after, still ready when they own no
partition, and not healthy once their loop is stuck (a hook freezes the loop's thread on
SIGUSR1 while the server's thread goes on)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from triage.bus.embedded import free_port
from triage.bus.health import Health, serve
from triage.bus.settings import Settings

_WAIT_S = 60.0  # start-up (imports, model, group join) on a loaded 2-core machine


def get(port: int, path: str) -> tuple[int, str]:
    """(HTTP status, body) of GET ``path``; (0, error) while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def wait_for(what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes] | None = None,
             timeout_s: float = _WAIT_S) -> None:
    """Poll ``check`` every 50 ms until it holds; fail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert proc is None or proc.poll() is None, f"{what}: the worker exited {proc.poll()}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.05)


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
