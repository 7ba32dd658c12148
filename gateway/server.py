"""``triage serve``: load the model and the reference tables, connect what a broker offers, and
run the app (gateway/app.py) on uvicorn until SIGTERM or SIGINT.

Without a broker the gateway still answers ``/decision/v1`` from ``--model`` (or nothing:
``--registry`` needs the control topic) and ``--reference``, logs ``publishing_off``, and answers
503 on the Kafka-backed routes. With one, it publishes every decision (gateway/service.py) and
serves the asynchronous calls from its view (gateway/view.py); the topics must exist (`triage
topics create`).
"""

from __future__ import annotations

import gc
import signal
from pathlib import Path
from typing import Any

import structlog
import uvicorn

from triage.bus.clients import make_producer
from triage.bus.embedded import port_in_use
from triage.bus.errors import ConfigurationError, PortInUse
from triage.gateway.app import make_app
from triage.gateway.reference_thread import ReferenceThread
from triage.gateway.service import Gateway, Publisher
from triage.gateway.settings import GatewaySettings
from triage.gateway.view import AsyncOrders, View
from triage.model import artifact
from triage.model.reference import ReferenceTables, zip_code_warnings
from triage.producer.publisher import RecordPublisher


def build(settings: GatewaySettings, *, model_dir: Path | None, registry_dir: Path | None,
          reference_dir: Path | None, broker: bool) -> tuple[Any, list[Any]]:
    """(the ASGI app, what to close on the way out). Raises ConfigurationError for a model or
    reference data that cannot be used, or ``--registry`` without a broker; KafkaException
    when a topic is missing."""
    log = structlog.get_logger("gateway")
    closing: list[Any] = []
    try:
        return _build(settings, log, closing, model_dir=model_dir, registry_dir=registry_dir,
                      reference_dir=reference_dir, broker=broker)
    except BaseException:  # what was opened so far is closed: no consumer left reading
        for resource in reversed(closing):
            resource.close()
        raise


def _build(settings: GatewaySettings, log: Any, closing: list[Any], *, model_dir: Path | None,
           registry_dir: Path | None, reference_dir: Path | None, broker: bool
           ) -> tuple[Any, list[Any]]:
    follower = None
    if registry_dir is not None:
        if not broker:
            raise ConfigurationError("--registry needs a broker: the active version is on the "
                                     "models control topic; use --model DIR without one")
        from triage.model.registry import Registry
        from triage.scoring.follower import ModelFollower

        follower = ModelFollower(settings.connection, settings.topics,
                                 Registry(registry_dir), log=log).start()
        closing.append(follower)
        log.info("waiting_for_model", registry=str(registry_dir))
        first = follower.wait_first()
        if first is None:
            raise ConfigurationError("stopped before a model version was active")
        model = first.active
    else:
        assert model_dir is not None
        model = artifact.load(model_dir)
    if reference_dir is None and not broker:
        raise ConfigurationError("without a broker the gateway needs --reference DIR")
    reference = (ReferenceTables.load(reference_dir, encoding=settings.data.csv_encoding)
                 if reference_dir is not None else ReferenceTables.empty())
    for warning in zip_code_warnings(reference.keys("zip_codes")):
        log.warning("zip_codes_look_truncated", detail=warning)
    publisher = kafka = view = live = None
    if broker:
        log.info("reference_restoring", note="the reference streams, every partition, on top "
                 "of the CSVs; the gateway serves once they are read to their ends")
        live = ReferenceThread(settings, reference, snapshot=reference_dir is not None)
        closing.append(live)
        live.start()
        producer = make_producer(settings.connection)
        publisher = Publisher(settings, producer)
        closing.append(publisher)
        view = View(settings, settings.http.gateway_view_s)
        closing.append(view)
        view.start()
        kafka = AsyncOrders(settings, RecordPublisher(
            settings.connection, settings.topics.orders_topic, "order", "order_id",
            producer=producer), view)
        log.info("publishing_on", predictions=settings.topics.predictions_topic,
                 drift=settings.topics.drift_topic, orders=settings.topics.orders_topic)
    else:
        log.warning("publishing_off", note="no broker configured: /decision/v1 answers, "
                    "nothing is published, /v1/orders and /v1/predictions answer 503")
    gateway = Gateway(settings, model, reference, publisher, follower, live)
    # Ready while every background reader runs: the view of the topics and the reference
    # streams (whose tables would otherwise stop moving under the answers).
    def ready() -> bool:
        return (view is None or view.ready) and (live is None or live.healthy)

    app = make_app(gateway, max_body_bytes=settings.http.gateway_max_body_bytes, kafka=kafka,
                   ready=ready)
    log.info("gateway_loaded", model_version=model.version, reference_records=reference.size,
             broker=broker)
    if model.windowed:
        log.warning("windowed_features_not_joined", model_version=model.version,
                    features=list(model.windowed),
                    note="an order given over HTTP never passes the feature stage: these "
                         "features are null in its answers (windowed_unknown: not_joined), and "
                         "its decision may differ from the stream's (docs/contracts.md)")
    return app, closing


def run_gateway(settings: GatewaySettings, *, model_dir: Path | None, registry_dir: Path | None,
                reference_dir: Path | None, host: str, broker: bool) -> int:
    """Serve until SIGTERM/SIGINT (uvicorn finishes the requests in hand); returns 0. Raises
    PortInUse (exit 2) before loading anything if the port is taken."""
    if port_in_use(settings.http.gateway_port, host):
        raise PortInUse(settings.http.gateway_port, "HTTP", "--port or TRIAGE_GATEWAY_PORT")
    app, closing = build(settings, model_dir=model_dir, registry_dir=registry_dir,
                         reference_dir=reference_dir, broker=broker)
    # What lives as long as the process (modules, the model, the reference tables) out of the
    # cyclic collector's sight: a full collection, triggered by whichever thread allocates
    # (a batch's, mostly), holds the GIL while it scans them, and the event loop's probes with
    # it (95 ms with the exercise's tables, 7-25 ms frozen; docs/benchmarks.md, "The probes under
    # the largest batches").
    gc.freeze()
    log = structlog.get_logger("gateway")
    log.info("gateway_serving", host=host, port=settings.http.gateway_port,
             paths=["/decision/v1", "/decision/v1/batch", "/v1/orders",
                    "/v1/predictions/{order_id}", "/healthz", "/readyz", "/metrics", "/docs"])
    # uvloop's event loop and httptools' parser (pinned; what uvicorn's "auto" picks when
    # they are installed), by name so that a missing one fails here rather than serving at
    # about three quarters of the speed (docs/benchmarks.md, "HTTP front door").
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=settings.http.gateway_port,
                                           loop="uvloop", http="httptools",
                                           log_level="warning", access_log=False,
                                           lifespan="off"))
    # uvicorn shuts down on SIGTERM, then raises it again for the handler it found: with the
    # default one the process would die there, before the clients below flush and close.
    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        for resource in closing:
            resource.close()
        log.info("gateway_stopped")
    return 0
