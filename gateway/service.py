"""The HTTP front door's scoring: orders as the original exercise posts them, scored by the
stream workers' own core (scoring/core.py: the same validation, features, model and records),
and, with a broker, published like any other decision.

An HTTP order is ``{"order_id", "customer_id", "timestamp", "sku_code", "zip_code"}``. Its
``timestamp`` is ``YYYY-MM-DD HH:MM:SS`` (UTC, the CSVs' form) or ISO 8601 with or without an
offset (``2021-05-01T13:21:59.930321+00:00``, the exercise's own example; without an offset it
is UTC); empty or missing means now. Everything else about an order is checked by the workers'
validation (scoring/validation.py).

Publishing (when a broker is configured): every decision goes to the predictions topic like a
worker's, keyed by ``order_id``, with the header ``triage-origin: http`` and lineage -1
(``order_partition``, ``order_offset``: it was read from no partition), and the drift sampler's
share of them to the drift topic, so monitoring and audit see one stream. Publishing never
holds up an answer: records are handed to librdkafka, delivered in the background, and counted
in ``triage_gateway_publish_errors_total`` when the broker refuses them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from confluent_kafka import Producer

from triage.gateway import metrics
from triage.gateway.reference_thread import ReferenceThread
from triage.gateway.settings import GatewaySettings
from triage.model.artifact import Model
from triage.model.reference import ReferenceTables
from triage.producer.publisher import OrderError, parse_timestamp_ms
from triage.schemas.codec import Codec, codec_for
from triage.scoring.core import CoreConfig, Incoming, ScoringCore, core_config, split_hooks
from triage.scoring.hooks import load_hooks
from triage.scoring.validation import OrderValidator

ORIGIN_HEADER = "triage-origin"
FIELDS = ("order_id", "customer_id", "timestamp", "sku_code", "zip_code")


class InvalidTimestamp(ValueError):
    """A timestamp in neither accepted form."""


def timestamp_ms(value: str | None, now_ms: int | None = None) -> int:
    """UTC epoch milliseconds of an HTTP order's ``timestamp`` (module docstring); ``now_ms``
    (default: the clock) for an empty one. Raises InvalidTimestamp."""
    if value is None or not value.strip():
        return now_ms if now_ms is not None else int(time.time() * 1000)
    try:  # the rule `triage produce` and the replay use, so every path gives the same ms
        return parse_timestamp_ms(value.strip())
    except OrderError:
        raise InvalidTimestamp(f"{value!r} is neither YYYY-MM-DD HH:MM:SS (UTC) nor ISO 8601 "
                               "(2021-05-01T13:21:59.930321+00:00)") from None


def order_record(order: Mapping[str, Any], now_ms: int | None = None) -> dict[str, Any]:
    """An HTTP order as an order.avsc record (fields as text, ``timestamp`` as
    ``timestamp_ms``; ``now_ms`` for an empty one). Raises InvalidTimestamp."""
    record: dict[str, Any] = {name: str(order.get(name, "")) for name in FIELDS
                              if name != "timestamp"}
    record["timestamp_ms"] = timestamp_ms(order.get("timestamp"), now_ms)
    return record


@dataclass(frozen=True)
class Decision:
    """One order's answer: ``prediction`` (a prediction.avsc record) or ``error`` (the field,
    the reason and the message of the first thing wrong with it)."""

    order_id: str
    prediction: dict[str, Any] | None = None
    error: dict[str, str] | None = None

    def as_response(self) -> dict[str, Any]:
        """The original contract's two fields, then what else the prediction knows."""
        if self.prediction is None:
            return {"order_id": self.order_id, "error": self.error}
        p = self.prediction
        answer = {"order_id": self.order_id, "recommendation": p["recommendation"],
                  "model_version": p["model_version"], "probabilities": p["probabilities"],
                  "features": p["features"], "order_timestamp_ms": p["order_timestamp_ms"],
                  "reference_complete": not p["reference_wait_expired"],
                  # a model reading windowed features: the door cannot know them
                  "windowed_unknown": p["windowed_unknown"]}
        return answer


class Publisher:
    """Predictions and drift samples of HTTP decisions, to the topics the workers write."""

    def __init__(self, settings: GatewaySettings, producer: Producer) -> None:
        self.producer = producer
        self.topics = settings.topics
        # The workers' framing (Schema Registry when configured) on the workers' topics.
        self.predictions = codec_for(settings.connection, "prediction",
                                     self.topics.predictions_topic)
        self.samples = codec_for(settings.connection, "drift_sample", self.topics.drift_topic)

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            metrics.PUBLISH_ERRORS.inc()

    def publish(self, predictions: Sequence[tuple[bytes, dict[str, Any]]],
                samples: Sequence[tuple[bytes, dict[str, Any]]]) -> None:
        headers: list[tuple[str, str | bytes | None]] = [(ORIGIN_HEADER, b"http")]
        out = [(self.topics.predictions_topic, key, self.predictions.encode(record))
               for key, record in predictions]
        out += [(self.topics.drift_topic, key, self.samples.encode(record))
                for key, record in samples]
        for topic, key, value in out:
            try:
                self.producer.produce(topic, key=key, value=value, headers=headers,
                                      on_delivery=self._delivered)
            except BufferError:  # the broker is away and the local queue is full: the
                metrics.PUBLISH_ERRORS.inc()  # answer goes out, this record does not
        self.producer.poll(0)

    def close(self, timeout_s: float = 10.0) -> None:
        self.producer.flush(timeout_s)


class Gateway:
    """Scores HTTP orders with ``model`` and ``reference`` through the workers' core. Not
    thread-safe: the app calls it one request at a time, from its scoring thread or, while
    that has nothing to do, from its event loop's (gateway/app.py)."""

    def __init__(self, settings: GatewaySettings, model: Model, reference: ReferenceTables,
                 publisher: Publisher | None = None, follower: Any = None,
                 live: ReferenceThread | None = None) -> None:
        self.settings = settings
        self.publisher = publisher
        self.follower = follower  # scoring/follower.py ModelFollower, with --registry
        self.live = live  # the reference streams applied on top of ``reference``
        validator = OrderValidator(settings.validation)
        config: CoreConfig = core_config(settings.core)
        # TRIAGE_HOOKS too: the same checks and observers as a worker's batches.
        checks, observers = split_hooks(load_hooks(settings.core.hooks, settings))
        self.core = ScoringCore(model, reference, Codec("order"), config=config,
                                checks=[validator, *checks], observers=observers,
                                log=structlog.get_logger("gateway"))

    @property
    def model_version(self) -> str:
        return self.core.model.version

    def decide(self, orders: Sequence[Mapping[str, Any]], wait: bool = True
               ) -> list[Decision]:
        """One decision per order, in order, from one predict call. An order that cannot be
        scored (bad timestamp, a field the validation refuses) gets its error instead; the
        others are scored as usual. ``wait=False`` (the event loop): raise
        :class:`~triage.gateway.reference_thread.ReferenceBusy` before scoring anything if the
        reference reader holds the tables, rather than wait for it."""
        if self.follower is not None:  # a promotion: swap between two requests
            models = self.follower.take()
            if models is not None:
                self.core.model = models.active
        now_ms = int(time.time() * 1000)
        decisions: list[Decision | None] = [None] * len(orders)
        incoming: list[Incoming] = []
        positions: dict[int, int] = {}  # id() of the Incoming -> position in ``orders``
        for position, order in enumerate(orders):
            try:
                record = order_record(order, now_ms)
            except InvalidTimestamp as exc:
                decisions[position] = Decision(str(order.get("order_id", "")), error={
                    "field": "timestamp", "reason": "invalid_timestamp", "message": str(exc)})
                continue
            item = Incoming(record)
            positions[id(item)] = position
            incoming.append(item)
        if self.live is None:
            outcome = self.core.process(incoming)
            predictions = outcome.predictions  # the records, built once: they are amended
            complete = [True] * len(predictions)
        else:
            with self.live.reading(wait=wait):
                outcome = self.core.process(incoming)
                predictions = outcome.predictions
                complete = self.live.complete(np.fromiter(
                    (p.record["order_timestamp_ms"] for p in predictions), np.int64,
                    len(predictions))).tolist()
        for scored, whole in zip(predictions, complete, strict=True):
            position = positions[id(scored.item)]
            # Answered before every reference stream passed the order's time: the features
            # may miss events still to come, as a worker's expired wait may
            # (gateway/reference_thread.py).
            scored.record["reference_wait_expired"] = not whole
            decisions[position] = Decision(scored.record["order_id"], prediction=scored.record)
        for letter in outcome.dead_letters:
            position = positions[id(letter.item)]
            decisions[position] = Decision(str(orders[position].get("order_id", "")), error={
                "field": field_of(letter.message), "reason": letter.reason,
                "message": letter.message})
        if self.publisher is not None and (predictions or outcome.samples):
            self.publisher.publish([(p.key, p.record) for p in predictions],
                                   [(s.key, s.record) for s in outcome.samples])
        done = [d for d in decisions if d is not None]
        assert len(done) == len(orders), "every order ends in a prediction or an error"
        for decision in done:
            if decision.prediction is not None:
                metrics.DECISIONS.labels(decision.prediction["recommendation"]).inc()
            else:
                metrics.REFUSED.labels(decision.error["reason"] if decision.error else "").inc()
        return done


def field_of(message: str) -> str:
    """The order field a validation message is about (it starts with the field's name)."""
    first = message.split(" ", 1)[0]
    return "timestamp" if first == "timestamp_ms" else first if first in FIELDS else ""
