"""The scorer loop one worker process runs.

Per batch: consume up to ``batch_size`` records, decode them, compute the features for the
whole batch, call ``predict`` once, produce one prediction per order (and the sampled ones to
the drift topic), wait until the broker acknowledged every record produced, then commit the
batch's offsets. A crash anywhere before the commit means the batch is consumed again:
at-least-once, never at-most-once.

Bad data never stops the loop: a record that is too large, does not decode, fails a check hook
(validation is one) or makes scoring fail goes to the dead-letter topic with the reason, and
the rest of its batch is scored as usual. Infrastructure failures (a delivery the broker
refused, a commit that cannot be made) raise :class:`InfrastructureError`; the process exits
non-zero and the supervisor restarts it.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from confluent_kafka import Consumer, Message, TopicPartition

from bus.clients import make_consumer, make_producer, produce, records_of
from bus.settings import Settings
from consumer import metrics
from consumer.commit import AtLeastOnce, ExactlyOnce, transactional_id
from consumer.deadletter import dead_letter_headers
from consumer.hooks import CheckHook, ObserveHook, Rejection, ScoredBatch, hook_name
from consumer.sampler import sampled_indices
from consumer.validation import OrderValidator
from model.artifact import Model
from model.features import FeatureBatch
from model.orders import OrderColumns
from model.reference import ReferenceTables
from schemas.codec import DecodeError, codec_for

# librdkafka's default message.max.bytes is 1,000,000; stay under it with the headers.
_LARGEST_DEAD_LETTER = 900_000


@dataclass
class ScorerStats:
    consumed: int = 0
    predicted: int = 0
    sampled: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    batches: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"consumed": self.consumed, "predicted": self.predicted, "sampled": self.sampled,
                "dead_lettered": dict(self.dead_lettered), "batches": self.batches}


class Scorer:
    def __init__(self, settings: Settings, model: Model, reference: ReferenceTables,
                 worker_id: str = "0", status_file: Path | None = None,
                 extra_hooks: list[object] | None = None) -> None:
        self.settings = settings
        self.model = model
        self.reference = reference
        self.worker_id = worker_id
        self.orders = codec_for(settings, "order", settings.orders_topic)
        self.predictions = codec_for(settings, "prediction", settings.predictions_topic)
        self.samples = codec_for(settings, "drift_sample", settings.drift_topic)
        hooks = [OrderValidator(settings), *(extra_hooks or [])]
        self.check_hooks = [h for h in hooks if isinstance(h, CheckHook)]
        self.observe_hooks = [h for h in hooks if isinstance(h, ObserveHook)]
        self.consumer = make_consumer(settings)
        self.status_file = status_file
        self.assigned: set[int] = set()
        self.log = structlog.get_logger("scorer").bind(worker=worker_id)
        if settings.exactly_once:
            self.producer = make_producer(settings, **{
                "transactional.id": transactional_id(settings.group_id, worker_id)})
            self.committer: AtLeastOnce = ExactlyOnce(self.producer, self.consumer, self.log)
        else:
            self.producer = make_producer(settings)
            self.committer = AtLeastOnce(self.producer, self.consumer, self.log)
        self.class_names = [str(c) for c in model.classes]
        self.stats = ScorerStats()
        self._stop_requested = False
        self._revoked_now: set[int] = set()
        self._test_delay_s = settings.test_batch_delay_ms / 1000.0

    def request_stop(self) -> None:
        """Finish the batch in hand, commit it, leave the group (safe from a signal handler)."""
        self._stop_requested = True

    def run(self) -> ScorerStats:
        self.consumer.subscribe([self.settings.orders_topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        self.log.info("worker_started", topic=self.settings.orders_topic,
                      group=self.settings.group_id, model_version=self.model.version,
                      exactly_once=self.committer.transactional)
        timeout_s = self.settings.batch_timeout_ms / 1000.0
        last_report = last_status = time.monotonic()
        try:
            while not self._stop_requested:
                # Wait for the first record only; the batch is whatever is fetched by then (up
                # to batch_size), so a lone order is scored at once and a backlog in bulk.
                self._revoked_now.clear()
                batch = self.consumer.consume(1, timeout_s)
                if batch and self.settings.batch_size > 1:
                    batch += self.consumer.consume(self.settings.batch_size - 1, 0)
                if self._revoked_now:  # revoked by the second consume(): no longer ours
                    batch = [m for m in batch if m.partition() not in self._revoked_now]
                if batch:
                    self.process(batch)
                now = time.monotonic()
                if now - last_status >= 1.0:
                    self._write_status()
                    last_status = now
                if now - last_report >= 10.0:
                    self.log.info("progress", **self.stats.as_dict())
                    last_report = now
        finally:
            self.committer.abort_open()  # an unfinished transaction must not block readers
            self.consumer.close()  # leaves the group, so the partitions move on at once
            self.producer.flush(10.0)
            self.log.info("worker_stopped", **self.stats.as_dict())
        return self.stats

    # -- one batch -------------------------------------------------------------------------

    def process(self, batch: list[Message]) -> None:
        """Score one consumed batch; every record ends as a prediction or a dead letter."""
        started = time.perf_counter()
        self.committer.begin()
        consumed: list[Message] = []
        decoded: list[Message] = []
        records: list[dict] = []
        max_bytes = self.settings.max_message_bytes
        for msg in records_of(batch, self.log):
            consumed.append(msg)
            value = msg.value()
            if value is not None and len(value) > max_bytes:
                self._dead_letter(msg, "oversized", "RecordTooLarge",
                                  f"{len(value)} bytes, most allowed {max_bytes}")
                continue
            try:
                records.append(self.orders.decode(value))
            except DecodeError as exc:
                self._dead_letter(msg, exc.kind, "DecodeError", exc.reason)
                continue
            decoded.append(msg)
        for hook in self.check_hooks:
            decoded, records = self._apply_check(hook, decoded, records)
        if records:
            self._score(decoded, records)
        if self._test_delay_s:
            time.sleep(self._test_delay_s)  # TRIAGE_TEST_BATCH_DELAY_MS: tests only
        self.committer.finish(consumed)
        self.stats.consumed += len(consumed)
        self.stats.batches += 1
        metrics.CONSUMED.inc(len(consumed))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    def _apply_check(self, hook: CheckHook, msgs: list[Message], records: list[dict]
                     ) -> tuple[list[Message], list[dict]]:
        """Run one check hook; dead-letter what it rejects, return what it lets through."""
        if not records:
            return msgs, records
        try:
            rejections = {r.index: r for r in hook.check(records)}
        except Exception:
            metrics.HOOK_ERRORS.labels(hook_name(hook)).inc()
            rejections = {}
            for index, record in enumerate(records):  # find the orders it fails on
                try:
                    rejections.update((index, r) for r in hook.check([record]))
                except Exception as exc:
                    rejections[index] = Rejection(index, "hook_failed",
                                                  f"{hook_name(hook)}: {type(exc).__name__}: {exc}")
        for index, rejection in rejections.items():
            if 0 <= index < len(msgs):
                self._dead_letter(msgs[index], rejection.reason, "ValidationError",
                                  rejection.message)
        kept = [i for i in range(len(records)) if i not in rejections]
        return [msgs[i] for i in kept], [records[i] for i in kept]

    def _score(self, msgs: list[Message], records: list[dict]) -> None:
        orders = OrderColumns.from_records(records)
        try:
            features = orders.features(self.reference)
            recommendations, proba = self.model.predict(features)
        except Exception as exc:
            if len(records) > 1:  # find the record(s) to blame; the rest are scored as usual
                for msg, record in zip(msgs, records, strict=True):
                    self._score([msg], [record])
                return
            self._dead_letter(msgs[0], "scoring_failed", type(exc).__name__, str(exc))
            return
        scored_at = int(time.time() * 1000)
        self._publish(msgs, orders, features, recommendations.tolist(), proba.tolist(),
                      scored_at)
        if self.observe_hooks:
            self._observe(ScoredBatch(orders, features, recommendations.tolist(), proba,
                                      [m.timestamp()[1] for m in msgs], scored_at))

    def _observe(self, scored: ScoredBatch) -> None:
        for hook in self.observe_hooks:
            try:
                hook.observe(scored)
            except Exception as exc:
                metrics.HOOK_ERRORS.labels(hook_name(hook)).inc()
                self.log.error("hook_failed", hook=hook_name(hook), error=str(exc))

    def _publish(self, msgs: list[Message], orders: OrderColumns, features: FeatureBatch,
                 recommendations: list[str], proba: list[list[float]], scored_at: int) -> None:
        version = self.model.version
        hours = features.order_hour_of_day.tolist()
        stock = [None if v != v else v for v in features.inventory.tolist()]  # NaN -> null
        statuses = features.payment_status.tolist()
        zips = features.zip_code_available.tolist()
        timestamps = orders.timestamp_ms.tolist()
        encode = self.predictions.encode
        topic = self.settings.predictions_topic
        feature_records = []
        for i, msg in enumerate(msgs):
            feature_record = {"order_hour_of_day": hours[i], "inventory": stock[i],
                              "payment_status": statuses[i], "zip_code_available": zips[i]}
            feature_records.append(feature_record)
            value = encode({
                "order_id": orders.order_id[i],
                "customer_id": orders.customer_id[i],
                "recommendation": recommendations[i],
                "probabilities": dict(zip(self.class_names, proba[i], strict=True)),
                "model_version": version,
                "features": feature_record,
                "order_timestamp_ms": timestamps[i],
                "scored_at_ms": scored_at,
                "order_published_at_ms": msg.timestamp()[1],
                "order_partition": msg.partition(),
                "order_offset": msg.offset(),
            })
            self._produce(topic, orders.order_id[i].encode(), value)
        self.stats.predicted += len(msgs)
        for recommendation, count in Counter(recommendations).items():
            metrics.PREDICTIONS.labels(recommendation).inc(count)

        for i in sampled_indices(orders.order_id, self.settings.sample_rate):
            value = self.samples.encode({
                "order": {"order_id": orders.order_id[i], "customer_id": orders.customer_id[i],
                          "timestamp_ms": timestamps[i], "sku_code": orders.sku_code[i],
                          "zip_code": orders.zip_code[i]},
                "features": feature_records[i],
                "recommendation": recommendations[i],
                "probabilities": dict(zip(self.class_names, proba[i], strict=True)),
                "model_version": version,
                "scored_at_ms": scored_at,
            })
            self._produce(self.settings.drift_topic, orders.order_id[i].encode(), value)
            self.stats.sampled += 1

    def _dead_letter(self, msg: Message, reason: str, error_class: str, message: str) -> None:
        headers = dead_letter_headers(msg, reason, error_class, message, self.worker_id)
        value = msg.value()
        if value is not None and len(value) > _LARGEST_DEAD_LETTER:
            # Too large for any producer to send: keep its size, not its bytes, so the
            # record cannot stop the loop by failing its own dead-lettering.
            headers.append(("triage.errors.original-bytes", str(len(value)).encode()))
            value = None
        self._produce(self.settings.dlq_topic, msg.key(), value, headers=headers)
        self.stats.dead_lettered[reason] += 1
        metrics.DEAD_LETTERS.labels(reason).inc()
        self.log.warning("dead_lettered", reason=reason, error=message[:200],
                         partition=msg.partition(), offset=msg.offset())

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, **kwargs) -> None:
        produce(self.producer, topic, key=key, value=value,
                on_delivery=self.committer.on_delivery, **kwargs)

    # -- group membership ------------------------------------------------------------------
    # Callbacks receive only the partitions that change (cooperative-sticky is incremental).

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {p.partition for p in partitions}
        self.log.info("partitions_assigned", partitions=sorted(p.partition for p in partitions),
                      now_owned=sorted(self.assigned))
        self._write_status()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Batches are committed before the next consume(), where revocation happens, so
        # nothing delivered is left uncommitted when the partitions go; records of a revoked
        # partition that the same loop already fetched are dropped unscored (_revoked_now).
        self.assigned -= {p.partition for p in partitions}
        self._revoked_now |= {p.partition for p in partitions}
        self.log.info("partitions_revoked", partitions=sorted(p.partition for p in partitions),
                      now_owned=sorted(self.assigned))
        self._write_status()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned -= {p.partition for p in partitions}
        self._revoked_now |= {p.partition for p in partitions}
        self.log.warning("partitions_lost", partitions=sorted(p.partition for p in partitions))
        self._write_status()

    def lag(self) -> int | None:
        """Records behind the end of this worker's partitions, from the high watermarks of its
        own fetches (exact on any broker); None until every partition has been fetched."""
        if not self.assigned:
            return 0
        topic = self.settings.orders_topic
        total = 0
        for tp in self.consumer.position([TopicPartition(topic, p) for p in self.assigned]):
            high = self.consumer.get_watermark_offsets(tp, cached=True)
            if tp.offset < 0 or high is None or high[1] < 0:
                return None
            total += max(0, high[1] - tp.offset)
        return total

    def _write_status(self) -> None:
        """Publish partitions, lag and counts for the supervisor (readiness, autoscaling)."""
        if self.status_file is None:
            return
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "worker": self.worker_id,
                                   "partitions": sorted(self.assigned), "lag": self.lag(),
                                   "consumed": self.stats.consumed}))
        tmp.replace(self.status_file)
