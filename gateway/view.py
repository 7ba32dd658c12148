"""The asynchronous calls of the HTTP front door: submit an order to Kafka, then ask for its
prediction by ``order_id``, from any gateway process.

Each gateway keeps a bounded **view** of three topics, read by a background thread that assigns
itself every partition (no consumer group, no commits, like consumer/reader.py), from
``TRIAGE_GATEWAY_VIEW_S`` seconds back (``offsets_for_times``) and then as records arrive:

* the orders topic: which orders exist (answer 202 "accepted, not scored yet");
* the predictions topic: the latest prediction of each order (200);
* the dead-letter topic: the reason an order was refused (422), from its headers, by the
  record's key (the workers keep the order's key, its ``order_id``).

Entries older than the window (by their record's timestamp) are dropped as the view goes, so
memory stays bounded by the traffic of the window. Several gateways run side by side, and any
of them answers for any order. An order never seen in the window (or older than it) is 404.
The view is ready (``/readyz``) once it has read up to the end offsets it found at start.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

import structlog
from confluent_kafka import KafkaError, TopicPartition

from triage.bus.clients import make_consumer, partitions_of
from triage.bus.deadletter import REASON_HEADER, headers_dict
from triage.bus.errors import BadRecord
from triage.gateway.service import InvalidTimestamp, field_of, order_record
from triage.gateway.settings import GatewaySettings
from triage.producer.publisher import RecordPublisher
from triage.schemas.codec import codec_for
from triage.scoring.validation import OrderValidator

_POLL_S = 0.2
_MESSAGE_HEADER = "__connect.errors.exception.message"


class View:
    """What the orders, predictions and dead-letter topics said about each order in the last
    ``window_s`` seconds (module docstring). Thread-safe."""

    def __init__(self, settings: GatewaySettings, window_s: float) -> None:
        self.topics = settings.topics
        self.window_ms = int(window_s * 1000)
        self.codec = codec_for(settings.connection, "prediction", self.topics.predictions_topic)
        self.orders = codec_for(settings.connection, "order", self.topics.orders_topic)
        self._lock = threading.Lock()
        # order_id -> (record time, ms; what the topic said), oldest first
        self._seen: OrderedDict[str, tuple[int, None]] = OrderedDict()
        self._predicted: OrderedDict[str, tuple[int, dict[str, Any]]] = OrderedDict()
        self._refused: OrderedDict[str, tuple[int, dict[str, str]]] = OrderedDict()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self.log = structlog.get_logger("gateway.view")
        self.consumer = make_consumer(settings.connection, f"triage-gateway-{uuid.uuid4().hex}")
        since = int(time.time() * 1000) - self.window_ms
        wanted = [TopicPartition(tp.topic, tp.partition, since)
                  for topic in (self.topics.orders_topic, self.topics.predictions_topic,
                                self.topics.dlq_topic)
                  for tp in partitions_of(self.consumer, topic)]
        starts = self.consumer.offsets_for_times(wanted, timeout=10.0)
        self._ends = {}
        for tp in starts:
            _, high = self.consumer.get_watermark_offsets(tp, timeout=10.0)
            if tp.offset < 0:  # nothing that recent: start at the end
                tp.offset = high
            if high > tp.offset:
                self._ends[(tp.topic, tp.partition)] = high
        self.consumer.assign(starts)
        if not self._ends:
            self._caught_up.set()
        self._thread = threading.Thread(target=self._run, name="gateway-view", daemon=True)

    def start(self) -> View:
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        """Read up to where it started, and still reading."""
        return self._caught_up.is_set() and self._thread.is_alive()

    def noted(self, order_id: str) -> None:
        """An order this gateway just published: known before the view reads it back."""
        with self._lock:
            self._seen[order_id] = (int(time.time() * 1000), None)
            self._seen.move_to_end(order_id)

    def lookup(self, order_id: str) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) for ``order_id``: 200 prediction, 422 refused, 202 seen, 404."""
        with self._lock:
            predicted = self._predicted.get(order_id)
            refused = self._refused.get(order_id)
            seen = order_id in self._seen
        if predicted is not None:
            return 200, predicted[1]
        if refused is not None:
            return 422, {"order_id": order_id, "dead_lettered": refused[1]}
        if seen:
            return 202, {"order_id": order_id, "status": "accepted, not scored yet"}
        return 404, {"order_id": order_id, "detail": "no such order in the last "
                     f"{self.window_ms // 1000} s"}

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)
        self.consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception as exc:  # a broker or registry hiccup: log it, read on
                self.log.error("view_error", error=f"{type(exc).__name__}: {exc}")
                self._stop.wait(1.0)

    def _turn(self) -> None:
        for msg in self.consumer.consume(1000, _POLL_S):
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    self.log.warning("view_error", error=err.str())
                continue
            self._apply(msg)
        self._evict(int(time.time() * 1000) - self.window_ms)
        if not self._caught_up.is_set() and self._reached_ends():
            self._caught_up.set()
            self.log.info("view_ready", orders=len(self._seen),
                          predictions=len(self._predicted), refused=len(self._refused))

    def _reached_ends(self) -> bool:
        positions = self.consumer.position([TopicPartition(t, p) for t, p in self._ends])
        return all(tp.offset >= self._ends[(tp.topic, tp.partition)] for tp in positions)

    def _apply(self, msg: Any) -> None:
        topic, at = msg.topic(), msg.timestamp()[1]
        key = (msg.key() or b"").decode(errors="replace")
        try:
            if topic == self.topics.predictions_topic:
                record = self.codec.decode(msg.value())
                with self._lock:
                    # The highest revision wins, not the latest offset: a correction may
                    # reach the view before the revision it corrects (another partition).
                    before = self._predicted.get(record["order_id"])
                    if before is None or record["revision"] >= before[1]["revision"]:
                        self._predicted[record["order_id"]] = (at, record)
                        self._predicted.move_to_end(record["order_id"])
            elif topic == self.topics.dlq_topic:
                headers = headers_dict(msg.headers())
                reason = {"reason": headers.get(REASON_HEADER, "unknown"),
                          "message": headers.get(_MESSAGE_HEADER, "")}
                with self._lock:
                    self._refused[key] = (at, reason)
                    self._refused.move_to_end(key)
            else:
                order_id = self.orders.decode(msg.value())["order_id"] if msg.value() else key
                with self._lock:
                    self._seen[order_id] = (at, None)
                    self._seen.move_to_end(order_id)
        except BadRecord:  # not ours to judge: the workers dead-letter it
            return

    def _evict(self, before_ms: int) -> None:
        tables: tuple[OrderedDict[str, tuple[int, Any]], ...] = (
            self._seen, self._predicted, self._refused)
        with self._lock:
            for table in tables:
                while table and next(iter(table.values()))[0] < before_ms:
                    table.popitem(last=False)


class AsyncOrders:
    """``POST /v1/orders`` and ``GET /v1/predictions/{order_id}``: orders validated as the
    workers would, then published to the orders topic; answers from the :class:`View`."""

    def __init__(self, settings: GatewaySettings, publisher: RecordPublisher, view: View) -> None:
        self.publisher = publisher
        self.view = view
        self.validator = OrderValidator(settings.validation)

    def submit(self, order: dict[str, Any]) -> dict[str, Any] | None:
        """Publish ``order``; returns None, or the 422 detail of what is wrong with it."""
        try:
            record = order_record(order)
        except InvalidTimestamp as exc:
            return {"loc": ["body", "timestamp"], "msg": str(exc), "type": "invalid_timestamp"}
        problem = self.validator.problem(record, int(time.time() * 1000))
        if problem is not None:
            reason, message = problem
            return {"loc": ["body", field_of(message)], "msg": message, "type": reason}
        failed = self.publisher.failed
        self.publisher.publish(record)
        undelivered = self.publisher.producer.flush(10.0)
        if undelivered or self.publisher.failed > failed:
            raise BrokerRefused(f"the orders topic did not take the order within 10 s: "
                                f"{dict(self.publisher.errors) or 'no acknowledgement'}")
        self.view.noted(record["order_id"])
        return None

    def lookup(self, order_id: str) -> tuple[int, dict[str, Any]]:
        return self.view.lookup(order_id)


class BrokerRefused(Exception):
    """The broker did not take a submitted order."""
