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

The event loop only moves bytes and answers the probes: the CPU work of the decision routes
runs on one thread of the app's own (``scoring``), one request at a time in arrival order, so
``/healthz`` and ``/readyz`` answer while the largest batch is scored (10,000 orders: about
0.3 s of CPU here, seconds on a throttled pod, against the kubelet's 5 s probe timeout). For the
batch that is all of it: the body is read on the loop, then parsed, validated, scored and
serialised on the scoring thread, the validation and the serialisation ``BATCH_CHUNK`` orders a
call so that the loop's thread gets the GIL between calls (a call holds it throughout;
docs/benchmarks.md, "The probes under the largest batches"). One order (``/decision/v1``: under
a millisecond of CPU) is scored on the loop itself when the scoring thread has nothing to do,
and after what it has otherwise; its body and answer are FastAPI's, on the loop. One process is
one core: run more processes behind a load balancer for more. Bodies larger than
``max_body_bytes`` are refused with 413 (by their Content-Length before they are read, or as
they arrive). Every request that reaches the routes is logged (``http_request``: method, path,
status, milliseconds) and counted in ``triage_http_requests_total`` and
``triage_http_request_seconds``.
"""

from __future__ import annotations

import asyncio
import email.message
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import ClientDisconnect

from triage.gateway import metrics
from triage.gateway.reference_thread import ReferenceBusy
from triage.gateway.service import Decision, Gateway
from triage.gateway.view import BrokerRefused

MAX_BATCH = 10_000
BATCH_CHUNK = 500  # orders a validation or serialisation call: 0.4-0.6 ms here, GIL held
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
    # windowed feature -> why its value is unknown: not_joined for every one the model reads,
    # since an order given here never passes the feature stage (scoring/windowed.py)
    windowed_unknown: dict[str, str] = {}


# The batch's body as FastAPI would declare and validate ``list[Order]`` with
# ``Body(max_length=MAX_BATCH)``; the route reads it itself, so the document says it here.
BATCH_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "array", "title": "Orders", "maxItems": MAX_BATCH,
    "items": {"$ref": "#/components/schemas/Order"}}}}}
VALIDATION_ERROR = {"description": "Validation Error", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}
_BATCH = TypeAdapter(Annotated[list[Order], Field(max_length=MAX_BATCH)])
_ORDERS = TypeAdapter(list[Order])
_ANSWERS = TypeAdapter(list[dict[str, Any]])


def batch_orders(body: bytes, content_type: str | None) -> list[Order]:
    """The orders of a batch call's body, checked as FastAPI checks a ``list[Order]`` body of
    at most ``MAX_BATCH`` (the same errors, in the same order): JSON text when
    ``content_type`` is JSON (``application/json`` or ``application/*+json``), else the bytes
    themselves, which are not a list. Validates ``BATCH_CHUNK`` orders a call. Raises
    RequestValidationError (422: missing body, JSON that does not parse, not a list, too many
    orders, invalid fields, with ``loc`` ``["body", index, field]``) and HTTPException 400
    (bytes that are not UTF-8 text)."""
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",),
                                       "msg": "Field required", "input": None}])
    value: Any = body
    if content_type is not None and _is_json(content_type):
        try:
            value = json.loads(body)
        except json.JSONDecodeError as exc:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos),
                                           "msg": "JSON decode error", "input": {},
                                           "ctx": {"error": exc.msg}}]) from exc
        except Exception as exc:  # FastAPI's answer to any other body it cannot read
            raise StarletteHTTPException(400, "There was an error parsing the body") from exc
    if not isinstance(value, list) or len(value) > MAX_BATCH:  # refused whole, not by item
        return _validated(_BATCH, value, 0)
    orders: list[Order] = []
    errors: list[dict[str, Any]] = []
    for start in range(0, len(value), BATCH_CHUNK):
        try:
            orders += _validated(_ORDERS, value[start:start + BATCH_CHUNK], start)
        except RequestValidationError as exc:
            errors += exc.errors()
    if errors:
        raise RequestValidationError(errors)
    return orders


def _validated(adapter: TypeAdapter[list[Order]], value: Any, start: int) -> list[Order]:
    """``adapter``'s orders from ``value``, the ``start``-th order of the body first; raises
    RequestValidationError with FastAPI's ``loc`` (``"body"``, the index in the body, ...)."""
    try:
        return adapter.validate_python(value, from_attributes=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    raise RequestValidationError([{**e, "loc": _in_body(e["loc"], start)} for e in errors])


def _in_body(loc: tuple[int | str, ...], start: int) -> tuple[int | str, ...]:
    """A list's error ``loc`` (``()`` for the list, ``(index, field...)`` for an order) as
    FastAPI names it in a body whose ``start``-th order is the list's first."""
    if loc and isinstance(loc[0], int):
        return ("body", start + loc[0], *loc[1:])
    return ("body", *loc)


def _is_json(content_type: str) -> bool:
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


def batch_json(decisions: Sequence[Decision]) -> bytes:
    """``{"decisions": [...]}`` as UTF-8 JSON, serialised ``BATCH_CHUNK`` decisions a call: the
    JSON value FastAPI's response model gives (its floats may be written differently:
    ``7.19e-6`` for ``7.19e-06``; any JSON reader reads the same numbers)."""
    parts = [_ANSWERS.dump_json([d.as_response() for d in decisions[i:i + BATCH_CHUNK]])[1:-1]
             for i in range(0, len(decisions), BATCH_CHUNK)]
    return b'{"decisions":[' + b",".join(parts) + b"]}"


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
    # The decision routes' CPU work, off the event loop: one thread, so that requests are
    # scored one at a time in arrival order (Gateway is not thread-safe).
    scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring")
    handed = 0  # calls given to the scoring thread whose end the loop has not yet seen

    async def on_scoring_thread(function: Callable[..., Any], *args: Any,
                                inline_when_idle: bool = False) -> Any:
        """``function(*args)`` on the scoring thread, after the calls handed to it before;
        ``inline_when_idle``: on the loop itself if there are none (the thread then runs
        nothing, and cannot start before the loop is free again), as ``function(*args,
        wait=False)``, which raises ReferenceBusy rather than wait for the reference reader's lock
        (held for seconds while the broker does not answer): then on the thread after all."""
        nonlocal handed
        if inline_when_idle and handed == 0:
            try:
                return function(*args, wait=False)
            except ReferenceBusy:  # the reference reader holds the tables: never wait on the loop
                pass
        loop = asyncio.get_running_loop()

        def ended() -> None:
            nonlocal handed
            handed -= 1

        handed += 1
        future = scoring.submit(function, *args)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(ended))
        return await asyncio.wrap_future(future)

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
        # Under a millisecond: on the loop, unless it would overtake a batch (or score beside
        # one); a hand-over to the thread costs about a quarter of a request's CPU.
        decided = (await on_scoring_thread(gateway.decide, [order.model_dump()],
                                           inline_when_idle=True))[0]
        if decided.prediction is None:
            return unprocessable([_error_detail(decided)])
        return decided.as_response()

    def answer_batch(body: bytes, content_type: str | None) -> bytes:
        orders = batch_orders(body, content_type)
        return batch_json(gateway.decide([o.model_dump() for o in orders]))

    @app.post("/decision/v1/batch", response_model=dict[str, list[dict[str, Any]]],
              responses={413: TOO_LARGE, 422: VALIDATION_ERROR},
              openapi_extra={"requestBody": BATCH_BODY})
    async def decision_batch(request: Request) -> Response:
        try:
            body = await request.body()
        except ClientDisconnect as exc:  # FastAPI's answer to a body it could not read
            raise StarletteHTTPException(400, "There was an error parsing the body") from exc
        return Response(await on_scoring_thread(answer_batch, body,
                                                request.headers.get("content-type")),
                        media_type="application/json")

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
