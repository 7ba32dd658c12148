"""The HTTP front door (gateway/), over real HTTP: uvicorn serving the app on a free port.

The exercise's own orders get the policy's answer one by one and in batches; bad input gets 422
(or 413) naming what is wrong, never a 500 (also property-based, from the OpenAPI document, with
schemathesis); the probes answer while the largest batch is scored; on a real broker with a
worker running, submitted orders become predictions the gateway answers with, decisions made
over HTTP are published, and unknown orders are 404.

This half needs no broker and starts no process; tests/integration/test_gateway.py has the rest."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.helpers import EXERCISE, HOLD_S, Client, exercise_orders, oracle, serving
from triage.gateway.app import MAX_BATCH, make_app
from triage.gateway.server import build
from triage.gateway.service import Decision, Gateway, timestamp_ms
from triage.model import artifact
from triage.model.features import FeatureBatch
from triage.model.policy import label
from triage.model.reference import ReferenceTables
from triage.settings import Settings


@pytest.fixture(scope="module")
def offline(exercise_model: Path) -> Iterator[int]:
    """A gateway on the exercise data with no broker."""
    app, closing = build(Settings(), model_dir=exercise_model, registry_dir=None,
                         reference_dir=EXERCISE, broker=False)
    assert closing == []
    with serving(app) as port:
        yield port


def test_every_exercise_order_gets_the_policy_answer_one_by_one_and_in_batches(
        offline: int) -> None:
    orders = exercise_orders()
    expected = oracle(EXERCISE)
    policy = label(FeatureBatch(
        expected["order_hour_of_day"].to_numpy(np.int64),
        expected["inventory"].to_numpy(float),
        expected["payment_status"].to_numpy(object),
        expected["zip_code_available"].to_numpy(bool))).tolist()
    client = Client(offline)
    answers = []
    for order in orders:
        status, body = client.request("POST", "/decision/v1", order)
        assert status == 200, body
        answers.append(body)
    assert [a["order_id"] for a in answers] == [o["order_id"] for o in orders]
    wrong = [a["order_id"] for a, p in zip(answers, policy, strict=True)
             if a["recommendation"] != p]
    assert wrong == [], f"{len(wrong)} orders differ from the policy, e.g. {wrong[:3]}"
    assert {a["model_version"] for a in answers} == {answers[0]["model_version"]}

    status, body = client.request("POST", "/decision/v1/batch", orders)
    assert status == 200
    assert body["decisions"] == answers  # one predict call, the same answers, in order

    # The exercise's own ISO form, with an offset, means the same moment.
    first = orders[0]
    iso = first["timestamp"].replace(" ", "T") + ".000000+00:00"
    status, body = client.request("POST", "/decision/v1", {**first, "timestamp": iso})
    assert status == 200 and body == answers[0]
    shifted = first["timestamp"].replace(" ", "T") + "+02:00"  # two hours earlier in UTC
    assert timestamp_ms(shifted) == timestamp_ms(first["timestamp"]) - 2 * 3_600_000


def test_bad_input_gets_422_naming_each_field_and_never_a_500(offline: int) -> None:
    client = Client(offline)
    good = {"order_id": "o-1", "customer_id": "c-1", "timestamp": "2021-05-01 13:21:59",
            "sku_code": "0001", "zip_code": "10115"}

    status, body = client.request("POST", "/decision/v1", {"order_id": "o-1", "sku_code": 7})
    assert status == 422
    named = {tuple(d["loc"]) for d in body["detail"]}
    assert {("body", "customer_id"), ("body", "zip_code"), ("body", "sku_code")} <= named

    for field, value, reason in (("timestamp", "yesterday", "invalid_timestamp"),
                                 ("order_id", "   ", "missing_field"),
                                 ("sku_code", " 0001", "invalid_field"),
                                 ("timestamp", "1999-12-31 23:59:59", "invalid_timestamp")):
        status, body = client.request("POST", "/decision/v1", {**good, field: value})
        assert status == 422, (field, value, body)
        assert body["detail"][0]["loc"] == ["body", field], body
        assert body["detail"][0]["type"] == reason, body

    status, body = client.request("POST", "/decision/v1", raw=b"{not json")
    assert status == 422
    # Python's JSON parser takes NaN and Infinity, which no JSON answer can echo back: the
    # 422 names the field without echoing the input, on every route that takes a body.
    for path, raw in (("/decision/v1", b'{"order_id": "o-1", "zip_code": Infinity}'),
                      ("/decision/v1", b"NaN"),
                      ("/decision/v1/batch", b'[{"order_id": NaN}]'),
                      ("/v1/orders", b'{"timestamp": -Infinity}')):
        status, body = client.request("POST", path, raw=raw)
        assert status == 422, (path, raw, body)
        assert all("input" not in d for d in body["detail"]), body
    status, body = client.request("POST", "/decision/v1", raw=b'{"order_id": "o-1", '
                                  b'"zip_code": Infinity}')
    assert ["body", "zip_code"] in [d["loc"] for d in body["detail"]]
    status, body = client.request("POST", "/decision/v1", raw=b"x" * (5 << 20))
    assert status == 413
    chunked = http.client.HTTPConnection("127.0.0.1", offline, timeout=30)  # no Content-Length
    chunked.request("POST", "/decision/v1", body=iter([b"x" * (1 << 20)] * 5),
                    headers={"Content-Type": "application/json"}, encode_chunked=True)
    assert chunked.getresponse().status == 413

    # The batch answers every order: errors inline, in place.
    status, body = client.request("POST", "/decision/v1/batch",
                                  [good, {**good, "order_id": "o-2", "timestamp": "nope"}])
    assert status == 200
    first, second = body["decisions"]
    assert first["recommendation"] and second["error"]["reason"] == "invalid_timestamp"

    # An empty timestamp means now: an order at this hour.
    status, body = client.request("POST", "/decision/v1", {**good, "timestamp": ""})
    assert status == 200 and abs(body["order_timestamp_ms"] - time.time() * 1000) < 60_000

    # Without a broker the Kafka-backed routes say so.
    assert client.request("POST", "/v1/orders", good)[0] == 503
    assert client.request("GET", "/v1/predictions/o-1")[0] == 503
    assert client.request("GET", "/healthz") == (200, {"status": "ok"})
    assert client.request("GET", "/readyz")[0] == 200
    status, text = client.request("GET", "/metrics")
    assert status == 200
    assert 'triage_http_requests_total{method="POST",route="/decision/v1",status="422"}' in text


def test_a_batch_names_each_bad_order_by_its_place_and_refuses_more_than_max_batch(
        offline: int) -> None:
    client = Client(offline)
    orders = exercise_orders()
    full = [orders[i % len(orders)] for i in range(MAX_BATCH)]
    bad = dict(full[-1])
    del bad["customer_id"]
    status, body = client.request("POST", "/decision/v1/batch",
                                  [{**full[0], "sku_code": 7}, *full[1:-1], bad])
    assert status == 422
    assert [d["loc"] for d in body["detail"]] == [["body", 0, "sku_code"],
                                                  ["body", MAX_BATCH - 1, "customer_id"]]
    status, body = client.request("POST", "/decision/v1/batch", [*full, full[0]])
    assert status == 422 and [d["loc"] for d in body["detail"]] == [["body"]], body
    for raw in (b"", b'{"order_id": "o-1"}'):  # no body; one order, not a list of them
        status, body = client.request("POST", "/decision/v1/batch", raw=raw)
        assert status == 422 and [d["loc"] for d in body["detail"]] == [["body"]], body
    status, body = client.request("POST", "/decision/v1/batch", full)
    assert status == 200 and len(body["decisions"]) == MAX_BATCH


class HeldBatches(Gateway):
    """The gateway, except that a batch of ``MAX_BATCH`` orders, once its scoring has begun
    (``scoring`` is set), waits there for ``let_go`` (at most ``HOLD_S``); ``held_to_the_end``
    says whether it was let go rather than going on by itself."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.scoring, self.let_go = threading.Event(), threading.Event()
        self.held_to_the_end: bool | None = None

    def decide(self, orders: Sequence[Mapping[str, Any]], wait: bool = True
               ) -> list[Decision]:
        if len(orders) == MAX_BATCH:
            self.scoring.set()
            self.held_to_the_end = self.let_go.wait(HOLD_S)
        return super().decide(orders, wait)


def test_probes_answer_while_a_maximum_batch_is_scored(exercise_model: Path) -> None:
    """Kubernetes restarts a pod whose /healthz does not answer: the event loop must answer it
    while a batch is scored. The batch is held in its scoring until the probes have answered;
    on the event loop, it would hold them too, until it went on by itself."""
    gateway = HeldBatches(Settings(), artifact.load(exercise_model),
                          ReferenceTables.load(EXERCISE))
    orders = exercise_orders()
    batch = [orders[i % len(orders)] for i in range(MAX_BATCH)]
    answer: dict[str, Any] = {}
    with serving(make_app(gateway)) as port:
        def send() -> None:
            answer["status"], answer["body"] = Client(port).request(
                "POST", "/decision/v1/batch", batch)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            assert gateway.scoring.wait(60), "the batch never reached its scoring"
            probes = [Client(port).request("GET", path) for path in ("/healthz", "/readyz")]
            batch_unanswered = "status" not in answer
        finally:
            gateway.let_go.set()
            sender.join(60)
    assert gateway.held_to_the_end, (
        f"the probes were answered only once the batch went on by itself after {HOLD_S:g} s")
    assert batch_unanswered
    assert probes == [(200, {"status": "ok"}),
                      (200, {"status": "ready", "model_version": gateway.model_version})]
    assert answer["status"] == 200 and len(answer["body"]["decisions"]) == MAX_BATCH


def test_the_openapi_contract_holds_for_generated_requests(offline: int) -> None:
    """schemathesis: bodies the schema allows and bodies it refuses, each checked for no 500
    and for an answer the document declares (status, content type, body schema)."""
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a test "
                                       "requirement (requirements-dev.txt)")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import (
        negative_data_rejection,
        positive_data_acceptance,
    )

    base = f"http://127.0.0.1:{offline}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    for path in ("/decision/v1", "/decision/v1/batch"):  # /v1/...: 503 here, tested above
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = schema[path]["POST"].as_strategy(generation_mode=mode)
            negative = mode is GenerationMode.NEGATIVE

            @settings(max_examples=40, deadline=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def check(case: Any) -> None:
                response = case.call(base_url=base)
                assert response.status_code < 500, (case.body, response.text)
                if negative:  # noqa: B023 (called at once, below)  refused: 422, or 413
                    assert response.status_code in (413, 422), (case.body, response.text)
                # The document cannot say everything the validation refuses (unprintable
                # characters, surrounding white space, TRIAGE_MAX_FIELD_LENGTH): a 422 for a
                # schema-valid body is declared, so acceptance of every such body is not
                # checked; refusal is checked just above, 413 included.
                case.validate_response(response, excluded_checks=[positive_data_acceptance,
                                                                  negative_data_rejection])

            check()


def test_a_model_reading_windowed_features_is_answered_saying_the_door_cannot_know_them(
        tmp_path: Path) -> None:
    """An order given over HTTP never passes the feature stage, so the door has no windowed
    state for it: the answer names every windowed feature the model reads as not_joined (their
    values null), and the order is still answered."""
    from triage.model.features import WINDOWED_NAMES
    from triage.model.train import train

    model_dir = tmp_path / "model"
    train(EXERCISE, model_dir, windowed=["customer_orders_1h", "sku_orders_10m"],
          min_accuracy=0.0)
    with capture_logs() as logs:
        app, _ = build(Settings(), model_dir=model_dir, registry_dir=None,
                       reference_dir=EXERCISE, broker=False)
    # said once at the start too, not only in each answer (a new user's trial missed it)
    (warning,) = [e for e in logs if e["event"] == "windowed_features_not_joined"]
    assert warning["log_level"] == "warning"
    assert warning["features"] == ["customer_orders_1h", "sku_orders_10m"]
    with serving(app) as port:
        status, body = Client(port).request("POST", "/decision/v1", exercise_orders()[0])
    assert status == 200, body
    assert body["windowed_unknown"] == {"customer_orders_1h": "not_joined",
                                        "sku_orders_10m": "not_joined"}
    assert all(body["features"][name] is None for name in WINDOWED_NAMES)
