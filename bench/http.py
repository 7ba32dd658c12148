"""``triage bench --http``: the HTTP front door (`triage serve`) against a per-request baseline.

Both are real processes on a free port, with the same model and CSV reference data (of the
exercise's size), without a broker (publishing off):

* the gateway: ``triage serve --model DIR --reference DIR``;
* the baseline: ``python -m triage.bench.http baseline``: what the earlier Flask services did
  for every request: one order, a one-row ``DataFrame``, scikit-learn's ``predict_proba``, a
  JSON answer, on the same FastAPI/uvicorn stack (so the comparison isolates the scoring).

One client in this process, on one keep-alive connection, sends requests one after another:
at a fixed rate (``--http-rate``, 500/s, paced; a request's latency is counted from the time it
was due, so a slow answer delays the next ones' figures too: no coordinated omission), then as
fast as answers come (saturation, requests/s), and the batch call (1,000 orders a request;
orders/s). Then Kubernetes' probes under the largest batches: ``/healthz`` and ``/readyz`` in
turn at ``PROBE_RATE``, each on a new connection at its due time (as the kubelet's, which do
not wait for each other), while one connection sends batches of ``MAX_BATCH`` orders back to
back (a probe that waits behind a batch is what makes the kubelet restart a busy pod:
deploy/kubernetes/gateway.yaml gives it 5 s). On 2 cores the client shares the machine with
the server.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from triage.bench.procstat import stop_and_reap
from triage.bus.embedded import free_port
from triage.bus.errors import InfrastructureError

BATCH = 1_000
PROBE_RATE = 50.0  # probes/s under the maximum batches
PROBES = ("/healthz", "/readyz")
PROBE_TIMEOUT_MS = 5_000  # the kubelet's timeoutSeconds in deploy/kubernetes/gateway.yaml


def baseline_app(model_dir: Path, reference_dir: Path) -> Any:
    """The per-request baseline's ASGI app: POST /decision/v1, one order per request."""
    import pandas as pd
    from fastapi import FastAPI
    from xgboost import XGBClassifier

    from triage.gateway.service import timestamp_ms
    from triage.model import artifact
    from triage.model.orders import OrderColumns
    from triage.model.reference import ReferenceTables

    model = artifact.load(model_dir)
    classifier = XGBClassifier(n_jobs=1)
    classifier.load_model(Path(model_dir) / model.manifest["model_file"])
    reference = ReferenceTables.load(reference_dir)
    classes = [str(c) for c in model.classes]
    app = FastAPI()

    @app.post("/decision/v1")
    async def decision(order: dict[str, str]) -> dict[str, str]:
        record = {**order, "timestamp_ms": timestamp_ms(order.get("timestamp"))}
        features = OrderColumns.from_records([record]).features(reference)
        row = pd.DataFrame(model.design_matrix(features), columns=model.columns.names)
        proba = classifier.predict_proba(row)[0]
        return {"order_id": order["order_id"], "recommendation": classes[int(np.argmax(proba))]}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


class Client:
    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, path: str, body: bytes) -> int:
        self.connection.request("POST", path, body=body,
                                headers={"Content-Type": "application/json"})
        response = self.connection.getresponse()
        response.read()
        return response.status


def orders_of(data_dir: Path) -> list[bytes]:
    with open(data_dir / "orders.csv", newline="") as f:
        return [json.dumps(row).encode() for row in csv.DictReader(f)]


@contextlib.contextmanager
def serving(command: list[str], port: int, log: Path, env: dict[str, str],
            timeout_s: float = 60.0) -> Iterator[None]:
    """``command`` as a process until the block ends; waits for /healthz first."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise InfrastructureError(f"{command[:3]} exited {proc.returncode}; see {log}")
            with contextlib.suppress(OSError):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    break
            if time.monotonic() > deadline:
                raise InfrastructureError(f"{command[:3]} not answering within {timeout_s} s")
            time.sleep(0.05)
        yield
    finally:
        stop_and_reap(proc)


def fixed_rate(port: int, bodies: list[bytes], rate: float, seconds: float) -> dict[str, Any]:
    """``rate`` requests/s for ``seconds``; latency from each request's due time (ms)."""
    client = Client(port)
    n = int(rate * seconds)
    latencies = np.empty(n)
    started = time.perf_counter()
    for i in range(n):
        due = started + i / rate
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        status = client.post("/decision/v1", bodies[i % len(bodies)])
        if status != 200:
            raise InfrastructureError(f"/decision/v1 answered {status} under load")
        latencies[i] = (time.perf_counter() - due) * 1000
    elapsed = time.perf_counter() - started
    return {"offered_per_s": rate, "achieved_per_s": round(n / elapsed, 1), "requests": n,
            **{f"p{p}": round(float(np.percentile(latencies, p)), 2) for p in (50, 95, 99)},
            "max": round(float(latencies.max()), 2)}


def saturation(port: int, bodies: list[bytes], requests: int) -> dict[str, Any]:
    """Requests back to back: requests/s and their latency (ms)."""
    client = Client(port)
    latencies = np.empty(requests)
    started = time.perf_counter()
    for i in range(requests):
        sent = time.perf_counter()
        client.post("/decision/v1", bodies[i % len(bodies)])
        latencies[i] = (time.perf_counter() - sent) * 1000
    elapsed = time.perf_counter() - started
    return {"requests_per_s": round(requests / elapsed, 1),
            **{f"p{p}": round(float(np.percentile(latencies, p)), 2) for p in (50, 99)}}


def batch_rate(port: int, bodies: list[bytes], orders: int) -> float:
    """Orders/s through /decision/v1/batch, ``BATCH`` orders a request."""
    client = Client(port)
    payloads = [b"[" + b",".join(bodies[i:i + BATCH]) + b"]"
                for i in range(0, min(len(bodies), orders), BATCH)]
    sent, started = 0, time.perf_counter()
    while sent < orders:
        for payload in payloads:
            if client.post("/decision/v1/batch", payload) != 200:
                raise InfrastructureError("/decision/v1/batch failed under load")
            sent += BATCH
            if sent >= orders:
                break
    return round(sent / (time.perf_counter() - started), 1)


def probe(port: int, path: str) -> int:
    """One GET of ``path`` on a connection of its own, as the kubelet sends a probe."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def probes_under_max_batches(port: int, bodies: list[bytes], seconds: float,
                             rate: float = PROBE_RATE) -> dict[str, Any]:
    """``PROBES`` in turn at ``rate``/s for ``seconds`` while batches of ``MAX_BATCH`` orders
    (``bodies`` over and over) run back to back on one keep-alive connection. Each probe is
    sent at its due time on a connection of its own, whether or not the earlier ones were
    answered (the kubelet's probes do not wait for each other), and timed from then: p50,
    p95, p99 and max in ms, and how many took over ``PROBE_TIMEOUT_MS`` (failed, to the
    kubelet); the batches' p50 and max in s, and their count. Raises InfrastructureError for
    an answer other than 200."""
    from triage.gateway.app import MAX_BATCH

    payload = b"[" + b",".join(bodies[i % len(bodies)] for i in range(MAX_BATCH)) + b"]"
    stop, failed = threading.Event(), []
    batch_seconds: list[float] = []

    def batches() -> None:
        client = Client(port)
        while not stop.is_set():
            sent = time.perf_counter()
            status = client.post("/decision/v1/batch", payload)
            if status != 200:
                failed.append(f"/decision/v1/batch answered {status}")
                return
            batch_seconds.append(time.perf_counter() - sent)

    def timed(path: str, due: float) -> float:
        status = probe(port, path)
        if status != 200:
            raise InfrastructureError(f"{path} answered {status} under the maximum batches")
        return (time.perf_counter() - due) * 1000

    sender = threading.Thread(target=batches, name="max-batches", daemon=True)
    sender.start()
    n = int(rate * seconds)
    # A thread for every probe if need be (they start as needed): none waits for a thread.
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="probe") as pool:
        try:
            started = time.perf_counter()
            answers = []
            for i in range(n):
                due = started + i / rate
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                answers.append(pool.submit(timed, PROBES[i % len(PROBES)], due))
            latencies = np.array([answer.result() for answer in answers])
        finally:
            stop.set()
            sender.join()
    if failed or not batch_seconds:
        raise InfrastructureError(failed[0] if failed else "no maximum batch finished")
    return {"probes": n, "offered_per_s": rate, "paths": list(PROBES),
            "batch_orders": MAX_BATCH, "batches": len(batch_seconds),
            "batch_p50_s": round(float(np.percentile(batch_seconds, 50)), 3),
            "batch_max_s": round(max(batch_seconds), 3),
            **{f"p{p}": round(float(np.percentile(latencies, p)), 2) for p in (50, 95, 99)},
            "max": round(float(latencies.max()), 2),
            "over_probe_timeout": int((latencies > PROBE_TIMEOUT_MS).sum())}


def run(triage: list[str], model_dir: Path, data_dir: Path, logs: Path, state_dir: Path, *,
        rate: float = 500.0, seconds: float = 10.0, saturation_requests: int = 3_000,
        batch_orders: int = 50_000) -> dict[str, Any]:
    """Every HTTP figure (module docstring). Both servers run without a broker: no
    TRIAGE_BOOTSTRAP_SERVERS and a state directory (``state_dir``) with no embedded broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update({"TRIAGE_STATE_DIR": str(state_dir), "TRIAGE_LOG_FORMAT": "json"})
    bodies = orders_of(data_dir)
    results: dict[str, Any] = {}
    port = free_port()
    with serving([*triage, "serve", "--model", str(model_dir), "--reference", str(data_dir),
                  "--port", str(port), "--log-level", "warning"], port, logs / "http-gateway.log",
                 env):
        saturation(port, bodies, 200)  # warm-up
        results["gateway_fixed_rate"] = fixed_rate(port, bodies, rate, seconds)
        results["gateway_saturation"] = saturation(port, bodies, saturation_requests)
        results["gateway_batch_orders_per_s"] = batch_rate(port, bodies, batch_orders)
        results["gateway_probes_under_max_batches"] = probes_under_max_batches(
            port, bodies, seconds)
    port = free_port()
    with serving([sys.executable, "-m", "triage.bench.http", "baseline", "--model",
                  str(model_dir), "--reference", str(data_dir), "--port", str(port)],
                 port, logs / "http-baseline.log", env):
        saturation(port, bodies, 100)
        results["baseline_fixed_rate"] = fixed_rate(port, bodies, min(rate, 100.0), seconds)
        results["baseline_saturation"] = saturation(port, bodies, saturation_requests // 3)
    results["batch_vs_baseline"] = round(
        results["gateway_batch_orders_per_s"] / results["baseline_saturation"]["requests_per_s"],
        1)
    results["orders"] = len(bodies)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triage.bench.http")
    parser.add_argument("mode", choices=["baseline"])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(baseline_app(args.model, args.reference), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False, lifespan="off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
