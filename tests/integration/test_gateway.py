"""The HTTP front door (gateway/), over real HTTP: uvicorn serving the app on a free port.

The exercise's own orders get the policy's answer one by one and in batches; bad input gets 422
(or 413) naming what is wrong, never a 500 (also property-based, from the OpenAPI document, with
schemathesis); the probes answer while the largest batch is scored; on a real broker with a
worker running, submitted orders become predictions the gateway answers with, decisions made
over HTTP are published, and unknown orders are 404.

This half needs a broker or starts processes; tests/unit/test_gateway.py has the rest."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.helpers import EXERCISE, HOLD_S, Background, Client, exercise_orders, serving, wait_for
from triage.bus.deadletter import headers_dict
from triage.bus.embedded import free_port
from triage.consumer.reader import TopicReader
from triage.consumer.supervisor import Supervisor
from triage.gateway.app import make_app
from triage.gateway.reference_thread import ReferenceThread
from triage.gateway.server import build
from triage.gateway.service import ORIGIN_HEADER, Gateway
from triage.model import artifact
from triage.model.reference import ReferenceTables
from triage.model.streams import PAYMENTS
from triage.producer.publisher import reference_publisher
from triage.settings import Settings


def test_probes_answer_while_the_reference_reader_holds_the_tables(
        settings: Settings, exercise_model: Path) -> None:
    """The reference reader holds the tables while it polls: seconds when the broker does not
    answer. A single order, scored on the event loop when the scoring thread is idle, waited
    for it there and held /healthz behind it (found in review); it now goes to the thread."""
    from triage.gateway.reference_thread import ReferenceThread

    class Asked:
        """The reader's lock, telling when the decision has come to it."""

        def __init__(self) -> None:
            self.lock, self.asked = threading.Lock(), threading.Event()

        def acquire(self, blocking: bool = True) -> bool:
            self.asked.set()
            return self.lock.acquire(blocking)

        def release(self) -> None:
            self.lock.release()

    tables = ReferenceTables.load(EXERCISE)
    live = ReferenceThread(settings, tables, snapshot=True)  # its reading thread not started
    live._lock = spy = Asked()  # type: ignore[assignment]
    gateway = Gateway(settings, artifact.load(exercise_model), tables, live=live)
    answer: dict[str, Any] = {}
    with serving(make_app(gateway)) as port:
        spy.lock.acquire()  # as the reader does while it polls
        release = threading.Timer(HOLD_S, spy.lock.release)
        release.start()
        try:
            def send() -> None:
                answer["status"], answer["body"] = Client(port).request(
                    "POST", "/decision/v1", exercise_orders()[0])

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            assert spy.asked.wait(60), "the decision never came to the tables"
            probe = Client(port).request("GET", "/healthz")
            held_during_probe = release.is_alive()
            decision_unanswered = "status" not in answer
        finally:
            if release.is_alive():
                release.cancel()
                spy.lock.release()
            sender.join(60)
            live.close()
    assert probe == (200, {"status": "ok"})
    assert held_during_probe, f"/healthz answered only once the lock went after {HOLD_S:g} s"
    assert decision_unanswered  # it waits for the tables, off the loop
    assert answer["status"] == 200, answer


def test_triage_serve_stops_cleanly_on_sigterm(exercise_model: Path, tmp_path: Path) -> None:
    """What Kubernetes and compose send: the process answers until then, then closes what it
    opened, says so and exits 0 (uvicorn raises the signal again once it has shut down)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(TRIAGE_STATE_DIR=str(tmp_path / "state"), TRIAGE_LOG_FORMAT="json")
    proc = subprocess.Popen([sys.executable, "-m", "triage.cli", "serve", "--model",
                             str(exercise_model), "--reference", str(EXERCISE), "--port",
                             str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        def answers() -> bool:
            with contextlib.suppress(OSError):
                return Client(port).request("GET", "/healthz")[0] == 200
            return False
        wait_for("triage serve answering", answers, timeout_s=60)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    events = [json.loads(line)["event"] for line in output.splitlines()
              if line.startswith("{")]
    assert events[-1] == "gateway_stopped", output


def test_submitted_orders_become_predictions_and_http_decisions_are_published(
        settings: Settings, model_dir: Path, history: Path, tmp_path: Path) -> None:
    background = Background()
    supervisor = background.supervise(Supervisor(settings, model_dir, history, workers=1))
    closing: list[Any] = []
    try:
        supervisor.wait_until_assigned(settings.topics.orders_partitions)
        app, closing = build(settings, model_dir=model_dir, registry_dir=None,
                             reference_dir=history, broker=True)
        with serving(app) as port:
            client = Client(port)
            wait_for("view ready", lambda: client.request("GET", "/readyz")[0] == 200)
            with open(history / "orders.csv", newline="") as f:
                orders = [dict(row) for _, row in zip(range(20), csv.DictReader(f),
                                                      strict=False)]
            for order in orders:
                status, body = client.request("POST", "/v1/orders", order)
                assert status == 202, body
                assert body["prediction_url"] == f"/v1/predictions/{order['order_id']}"
            first = client.request("GET", f"/v1/predictions/{orders[0]['order_id']}")
            assert first[0] in (200, 202)  # accepted at once, scored when a worker has it

            def all_scored() -> bool:
                return all(client.request("GET", f"/v1/predictions/{o['order_id']}")[0] == 200
                           for o in orders)

            wait_for("every submitted order scored", all_scored, timeout_s=90)
            for order in orders:
                _, streamed = client.request("GET", f"/v1/predictions/{order['order_id']}")
                _, direct = client.request("POST", "/decision/v1", order)
                assert streamed["recommendation"] == direct["recommendation"]
                assert streamed["order_partition"] >= 0  # scored by the worker, from Kafka

            # A payment published now, for an order in no CSV, reaches the answers: the live
            # reference streams apply on top of the --reference snapshot.
            live = {"order_id": "live-order-1", "customer_id": "c", "sku_code": "s",
                    "zip_code": "z", "timestamp": ""}
            status, before = client.request("POST", "/decision/v1", live)
            assert status == 200 and before["features"]["payment_status"] == "MISSING"
            assert isinstance(before["reference_complete"], bool)
            payments = reference_publisher(PAYMENTS, settings.connection,
                                           settings.topics.topic_of("payments"))
            payments.publish({"order_id": "live-order-1", "payment_status": "DECLINED",
                              "timestamp_ms": int(time.time() * 1000) - 60_000})
            payments.producer.flush(10)
            wait_for("the payment in the answers", lambda: client.request(
                "POST", "/decision/v1", live)[1]["features"]["payment_status"] == "DECLINED")

            assert client.request("GET", "/v1/predictions/never-seen")[0] == 404
            status, body = client.request("POST", "/v1/orders", {**orders[0], "order_id": ""})
            assert status == 422 and body["detail"][0]["loc"] == ["body", "order_id"]

            # The reference reader stops (its Kafka client goes away under it): /readyz says
            # so, instead of answering from tables that no longer move.
            (reference,) = [r for r in closing if isinstance(r, ReferenceThread)]
            assert client.request("GET", "/readyz")[0] == 200
            reference.reader.reader.consumer.close()
            wait_for("/readyz 503", lambda: client.request("GET", "/readyz")[0] == 503)
            assert reference.failed is not None

        # Every /decision/v1 above was published too, marked as HTTP, lineage -1.
        with TopicReader(settings.connection, settings.topics.predictions_topic,
                         "prediction") as reader:
            http_made = [record for msg, record in reader.read(idle_s=3.0)
                         if headers_dict(msg.headers()).get(ORIGIN_HEADER) == "http"]
        assert {r["order_id"] for r in http_made} == {o["order_id"] for o in orders} | {
            "live-order-1"}
        assert all(r["order_partition"] == -1 for r in http_made)
    finally:
        for resource in closing:
            resource.close()
        supervisor.request_stop()
        for thread in background.threads:
            thread.join(60)
