"""Liveness and readiness of a long-running process, served beside its Prometheus metrics.

One HTTP port per process answers three paths (the Kubernetes probe conventions):

* ``/healthz``: 503 ``starting`` until the process's loop (or its restore) completed its first
  turn; then 200 while it completes a turn (a batch, an idle poll, a step of a restore) at
  least every ``stall_ms``, 503 ``stalled`` once it has not. Start-up (imports, model, broker
  metadata) is a Kubernetes startup probe's to bound; the liveness probe restarts a stalled
  pod.
* ``/readyz``: 200 once every readiness condition the process declared is met (a worker: model
  loaded, reference tables restored, consumer group joined); 503 with the missing ones until
  then. A worker that owns no partition (more replicas than partitions, or during a rollout)
  is still ready: owning partitions is the group's decision, not the pod's state, and shows in
  the ``triage_owned_partitions`` metric instead.
* ``/metrics``: prometheus-client's exposition of ``registry``.

Both health answers are JSON: ``{"status": "starting"|"ok"|"stalled"|"ready"|"not_ready",
...}``.

The server is prometheus-client's WSGI app and the standard library's WSGI server in a daemon
thread, as prometheus-client's own ``start_http_server`` runs it. A worker does not import an
ASGI framework for three fixed answers: it would add to every worker's start-up and memory.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

from triage.bus.errors import PortInUse

StartResponse = Callable[..., Any]


class Health:
    """The liveness and readiness state of one process, safe to update from any thread.

    ``stall_ms``: how long the loop may go without :meth:`beat` before ``/healthz`` fails (ms).
    ``conditions``: names of the readiness conditions still to meet; :meth:`met` meets one.
    Not live before the first :meth:`beat` (starting up).
    """

    def __init__(self, stall_ms: int, conditions: Iterable[str]) -> None:
        if stall_ms <= 0:
            raise ValueError(f"stall_ms must be positive, got {stall_ms}")
        self.stall_s = stall_ms / 1000.0
        self._last_beat: float | None = None
        self._missing = set(conditions)
        self._lock = threading.Lock()

    def beat(self) -> None:
        """The loop completed a turn (one attribute write: cheap enough for every batch)."""
        self._last_beat = time.monotonic()

    def met(self, condition: str) -> None:
        """A readiness condition is met (meeting one twice, or an unknown one, is harmless)."""
        with self._lock:
            self._missing.discard(condition)

    def live(self) -> tuple[bool, dict[str, Any]]:
        """(alive?, the JSON body): alive while the last beat is under ``stall_ms`` old."""
        if self._last_beat is None:
            return False, {"status": "starting", "stall_s": self.stall_s}
        since = time.monotonic() - self._last_beat
        alive = since <= self.stall_s
        return alive, {"status": "ok" if alive else "stalled",
                       "since_last_turn_s": round(since, 3), "stall_s": self.stall_s}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """(ready?, the JSON body): ready once no condition is missing."""
        with self._lock:
            missing = sorted(self._missing)
        return not missing, {"status": "not_ready" if missing else "ready", "waiting_for": missing}


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds are not worth a log line each."""


def health_app(health: Health, registry: CollectorRegistry = REGISTRY
               ) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """A WSGI app: ``/healthz`` and ``/readyz`` from ``health``, anything else ``/metrics``."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes] | Any:
        path = environ.get("PATH_INFO", "")
        if path not in ("/healthz", "/readyz"):
            return metrics(environ, start_response)
        ok, body = health.live() if path == "/healthz" else health.ready()
        payload = json.dumps(body).encode()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(payload)))])
        return iter([payload])

    return app


def serve(port: int, health: Health, registry: CollectorRegistry = REGISTRY,
          addr: str = "0.0.0.0", setting: str = "--metrics-port") -> WSGIServer:
    """Serve ``/healthz``, ``/readyz`` and ``/metrics`` on ``addr:port`` from a daemon thread.
    Returns the server (``shutdown()`` stops it). Raises :class:`PortInUse` (a configuration
    error, naming the port and ``setting``) if the port is taken."""
    try:
        server = make_server(addr, port, health_app(health, registry), _ThreadingServer,
                             handler_class=_QuietHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(port, "metrics, /healthz and /readyz", setting) from None
        raise
    threading.Thread(target=server.serve_forever, name=f"health-{port}", daemon=True).start()
    return server
