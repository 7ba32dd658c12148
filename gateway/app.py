"""The HTTP front door's routes (FastAPI): the original ``POST /decision/v1``, its batch form,
the asynchronous calls through Kafka, and the operational endpoints.

* ``POST /decision/v1``: one order (gateway/service.py for the fields) -> 200 ``{"order_id",
  "recommendation", "model_version", "probabilities", "features", "order_timestamp_ms"}``; 422
  with ``{"detail": [{"loc": ["body", FIELD], "msg", "type"}]}`` naming each bad field, the
  shape FastAPI gives for a body that does not parse.
* ``POST /decision/v1/batch``: ``[order, ...]`` (at most ``MAX_BATCH``) -> 200 ``{"decisions":
  [...]}`` in input order, from one predict call; an order that cannot be scored has
  ``{"order_id", "error": {"field", "reason", "message"}}`` in its place.
* ``POST /v1/orders`` -> 202 ``{"order_id", "prediction_url"}`` once the order is on the
  orders topic; ``GET /v1/predictions/{order_id}`` -> 200 with the prediction, 202 while it is
  not scored yet, 422 with the reason if it was dead-lettered, 404 for an order never seen
  (gateway/view.py). Both 503 without a broker.
* ``/healthz`` (200 while the process answers), ``/readyz`` (200 once the model and the
  reference tables are loaded and, with a broker, the view has read up to where it started),
  ``/metrics`` (Prometheus).

Endpoints are ``async``: scoring is CPU work of under a millisecond a request, run on the event
loop's thread, so requests are scored one at a time (one process is one core; run more
processes behind a load balancer for more). Bodies larger than ``max_body_bytes`` are refused
with 413 (by their Content-Length before they are read, or as they arrive). Every request that
reaches the routes is logged (``http_request``: method, path, status, milliseconds) and counted
in ``triage_http_requests_total`` and ``triage_http_request_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import structlog
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from triage.gateway import metrics
from triage.gateway.service import Decision, Gateway
from triage.gateway.view import BrokerRefused

MAX_BATCH = 10_000
TOO_LARGE = {"description": "the body is over TRIAGE_GATEWAY_MAX_BODY_BYTES"}


class Order(BaseModel):
    """An order as the original exercise posts it; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    order_id: Annotated[str, Field(min_length=1)]
    customer_id: Annotated[str, Field(min_length=1)]
    sku_code: Annotated[str, Field(min_length=1)]
    zip_code: Annotated[str, Field(min_length=1)]
    timestamp: str | None = None  # YYYY-MM-DD HH:MM:SS (UTC) or ISO 8601; empty: now


class Decided(BaseModel):
    """The answer: the original two fields, then what the prediction adds."""

    order_id: str
    recommendation: str
    model_version: str
    probabilities: dict[str, float]
    features: dict[str, Any]
    order_timestamp_ms: int
    reference_complete: bool  # every reference stream had passed the order's time


def unprocessable(errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"detail": errors}, status_code=422)


def _error_detail(decision: Decision) -> dict[str, Any]:
    error = decision.error or {}
    return {"loc": ["body", error.get("field") or "order"], "msg": error.get("message", ""),
            "type": error.get("reason", "invalid")}


def make_app(gateway: Gateway, *, max_body_bytes: int = 4 << 20,
             kafka: Any = None, ready: Callable[[], bool] = lambda: True) -> Any:
    """The ASGI app. ``kafka``: the asynchronous side (gateway/view.py ``AsyncOrders``), None
    without a broker; ``ready``: whether /readyz answers 200."""
    app = FastAPI(title="triage", version="1",
                  description="Order triage: the original POST /decision/v1, its batch form, "
                              "and asynchronous calls through Kafka.")
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:  # a body that is not JSON text (bytes that are not UTF-8)
            return unprocessable([{"loc": ["body"], "msg": str(exc.detail),
                                   "type": "invalid_body"}])
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes each bad value back: NaN or Infinity (which Python's JSON
        # parser accepts) cannot be encoded, and a bad batch would come back whole.
        return unprocessable([{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                              for e in exc.errors()])

    @app.exception_handler(BrokerRefused)
    async def broker_refused(request: Request, exc: BrokerRefused) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)


    @app.post("/decision/v1", response_model=Decided,
              responses={422: {"description": "an invalid field, named in detail[].loc"},
                         413: TOO_LARGE})
    async def decision(order: Order) -> Any:
        decided = gateway.decide([order.model_dump()])[0]
        if decided.prediction is None:
            return unprocessable([_error_detail(decided)])
        return decided.as_response()

    @app.post("/decision/v1/batch", responses={413: TOO_LARGE})
    async def decision_batch(orders: Annotated[list[Order], Body(max_length=MAX_BATCH)]
                             ) -> dict[str, list[dict[str, Any]]]:
        decided = gateway.decide([o.model_dump() for o in orders])
        return {"decisions": [d.as_response() for d in decided]}

    @app.post("/v1/orders", status_code=202,
              responses={503: {"description": "no broker configured"}, 413: TOO_LARGE})
    async def submit(order: Order) -> Any:
        if kafka is None:
            return _no_broker()
        # Waits for the broker's acknowledgement: off the event loop, which answers others.
        problem = await run_in_threadpool(kafka.submit, order.model_dump())
        if problem is not None:
            return unprocessable([problem])
        return {"order_id": order.order_id,
                "prediction_url": f"/v1/predictions/{order.order_id}"}

    @app.get("/v1/predictions/{order_id}",
             responses={202: {"description": "not scored yet"},
                        404: {"description": "never seen"},
                        422: {"description": "dead-lettered, with the reason"},
                        503: {"description": "no broker configured"}})
    async def prediction(order_id: str) -> Any:
        if kafka is None:
            return _no_broker()
        status, body = kafka.lookup(order_id)
        return JSONResponse(body, status_code=status)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Any:
        if ready():
            return {"status": "ready", "model_version": gateway.model_version}
        return JSONResponse({"status": "not_ready"}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # Starlette's limit: 413 by Content-Length before the body is read, or as it arrives.
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=max_body_bytes)
    app.add_middleware(AccessLog)
    return app


class AccessLog:
    """ASGI middleware: every request logged (``http_request``: method, path, status, ms) and
    counted by route and status. A plain ASGI wrapper: Starlette's ``BaseHTTPMiddleware``
    (``@app.middleware``) cost about a tenth of a request's time in a profile."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.log = structlog.get_logger("gateway")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app sends a response start

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.REQUESTS.labels(scope["method"], route, str(status)).inc()
            metrics.LATENCY.labels(route).observe(elapsed)
            self.log.info("http_request", method=scope["method"], path=scope["path"],
                          status=status, ms=round(elapsed * 1000, 2))


def _no_broker() -> JSONResponse:
    return JSONResponse({"detail": "no Kafka broker configured: start `triage serve` with "
                                   "--bootstrap HOST:PORT, TRIAGE_BOOTSTRAP_SERVERS, or a "
                                   "running `triage broker`"}, status_code=503)
