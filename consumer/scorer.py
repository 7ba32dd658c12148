"""The scorer loop one worker process runs.

Per batch: consume up to ``batch_size`` records, decode them, compute the features for the
whole batch, call ``predict`` once, produce one prediction per order (and the sampled ones to
the drift topic), wait until the broker acknowledged every record produced, then commit the
batch's offsets. A crash anywhere before the commit means the batch is consumed again:
at-least-once, never at-most-once.

Bad data never stops the loop: a record that is too large, does not decode, fails a check hook
(validation is one) or makes scoring fail goes to the dead-letter topic with the reason, and the
rest of its batch is scored as usual. A slow hook cannot stop it either: the hooks of one batch
share a deadline (``TRIAGE_PROCESSING_DEADLINE_MS``, see :mod:`triage.consumer.hooks`), and the
orders they have not finished by then are dead-lettered as ``timeout``; the consumer is never
polled in the middle of a batch. Infrastructure failures (a delivery the broker refused, a
commit that cannot be made) raise :class:`InfrastructureError`; the process exits non-zero and
the supervisor restarts it. """

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from confluent_kafka import Consumer, Message, TopicPartition

from triage.bus.clients import (
    PRODUCER_MAX_MESSAGE_BYTES,
    make_consumer,
    make_producer,
    produce,
    records_of,
    topic_max_message_bytes,
)
from triage.bus.settings import Settings
from triage.consumer import metrics
from triage.consumer.commit import AtLeastOnce, ExactlyOnce, transactional_id
from triage.consumer.deadletter import dead_letter_headers, fit_dead_letter
from triage.consumer.hooks import (
    CheckHook,
    HookRunner,
    HookTimeout,
    ObserveHook,
    Rejection,
    ScoredBatch,
    hook_name,
)
from triage.consumer.sampler import sampled_indices
from triage.consumer.validation import OrderValidator
from triage.model.artifact import Model
from triage.model.features import FeatureBatch
from triage.model.orders import OrderColumns
from triage.model.reference import ReferenceTables, truncated_zip_match
from triage.schemas.codec import DecodeError, codec_for


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
        # The built-in validation runs inline (it is bounded by construction); hooks from
        # TRIAGE_HOOKS run through a HookRunner, under the batch's deadline.
        runners = [HookRunner(h) for h in extra_hooks or []]
        self.check_hooks: list[CheckHook | HookRunner] = [
            OrderValidator(settings), *(r for r in runners if isinstance(r.hook, CheckHook))]
        self.observe_hooks = [r for r in runners if isinstance(r.hook, ObserveHook)]
        self.deadline_s = settings.processing_deadline_ms / 1000.0
        # The largest dead letter the producer and the dead-letter topic both accept.
        topic_limit = topic_max_message_bytes(settings, settings.dlq_topic)
        self.dead_letter_limit = min(PRODUCER_MAX_MESSAGE_BYTES,
                                     topic_limit or PRODUCER_MAX_MESSAGE_BYTES)
        self._zip_warned = False
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
        deadline = time.monotonic() + self.deadline_s
        self.committer.begin()
        consumed: list[Message] = []
        decoded: list[Message] = []
        records: list[dict] = []
        max_bytes = self.settings.max_message_bytes
        for msg in records_of(batch, self.log):
            consumed.append(msg)
            value = msg.value()
            size = len(value or b"") + len(msg.key() or b"")
            if size > max_bytes:
                self._dead_letter(msg, "oversized", "RecordTooLarge",
                                  f"key and value {size} bytes, most allowed {max_bytes}")
                continue
            try:
                records.append(self.orders.decode(value))
            except DecodeError as exc:
                self._dead_letter(msg, exc.reason, "DecodeError", exc.message)
                continue
            decoded.append(msg)
        for hook in self.check_hooks:
            decoded, records = self._apply_check(hook, decoded, records, deadline)
        if records:
            self._score(decoded, records, deadline)
        if self._test_delay_s:
            time.sleep(self._test_delay_s)  # TRIAGE_TEST_BATCH_DELAY_MS: tests only
        self.committer.finish(consumed)
        self.stats.consumed += len(consumed)
        self.stats.batches += 1
        metrics.CONSUMED.inc(len(consumed))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    def _apply_check(self, hook: CheckHook | HookRunner, msgs: list[Message],
                     records: list[dict], deadline: float
                     ) -> tuple[list[Message], list[dict]]:
        """Run one check hook; dead-letter what it rejects, and what it has not finished by
        ``deadline`` (monotonic seconds); return what it lets through."""
        if not records:
            return msgs, records
        name = hook.name if isinstance(hook, HookRunner) else hook_name(hook)
        try:
            rejections = {r.index: r for r in self._check(hook, records, deadline)}
        except HookTimeout as exc:
            rejections = self._timed_out(name, exc, range(len(records)))
        except Exception:
            metrics.HOOK_ERRORS.labels(name).inc()
            rejections = {}
            for index, record in enumerate(records):  # find the orders it fails on
                try:
                    rejections.update((index, r) for r in self._check(hook, [record], deadline))
                except HookTimeout as exc:
                    rejections.update(self._timed_out(name, exc, range(index, len(records))))
                    break
                except Exception as exc:
                    rejections[index] = Rejection(index, "hook_failed",
                                                  f"{name}: {type(exc).__name__}: {exc}")
        for index, rejection in rejections.items():
            if 0 <= index < len(msgs):
                error_class = "TimeoutError" if rejection.reason == "timeout" \
                    else "ValidationError"
                self._dead_letter(msgs[index], rejection.reason, error_class, rejection.message)
        kept = [i for i in range(len(records)) if i not in rejections]
        return [msgs[i] for i in kept], [records[i] for i in kept]

    @staticmethod
    def _check(hook: CheckHook | HookRunner, records: list[dict], deadline: float
               ) -> list[Rejection]:
        if isinstance(hook, HookRunner):
            return hook.call("check", records, deadline) or []
        return list(hook.check(records))

    def _timed_out(self, name: str, exc: HookTimeout, indices: range) -> dict[int, Rejection]:
        metrics.HOOK_TIMEOUTS.labels(name).inc()
        self.log.error("hook_timeout", hook=name, orders=len(indices), error=str(exc))
        return {i: Rejection(i, "timeout", str(exc)) for i in indices}

    def _score(self, msgs: list[Message], records: list[dict], deadline: float) -> None:
        orders = OrderColumns.from_records(records)
        try:
            features = orders.features(self.reference)
            recommendations, proba = self.model.predict(features)
        except Exception as exc:
            if len(records) > 1:  # find the record(s) to blame; the rest are scored as usual
                for i, (msg, record) in enumerate(zip(msgs, records, strict=True)):
                    if time.monotonic() > deadline:
                        for late in msgs[i:]:
                            self._dead_letter(late, "timeout", "TimeoutError",
                                              "not scored within the processing deadline "
                                              "while the batch was re-scored order by order")
                        return
                    self._score([msg], [record], deadline)
                return
            self._dead_letter(msgs[0], "scoring_failed", type(exc).__name__, str(exc))
            return
        self._count_unknown_zips(orders.zip_code)
        scored_at = int(time.time() * 1000)
        self._publish(msgs, orders, features, recommendations.tolist(), proba.tolist(),
                      scored_at)
        if self.observe_hooks:
            self._observe(ScoredBatch(orders, features, recommendations.tolist(), proba,
                                      [m.timestamp()[1] for m in msgs], scored_at), deadline)

    def _count_unknown_zips(self, zip_codes: list[str]) -> None:
        """Count orders to zips the reference data does not know (scored as not served), and
        warn once if they look like reference zips that lost their leading zeros."""
        known = self.reference.zip_available_from
        unknown = [z for z in zip_codes if z not in known]
        if not unknown:
            return
        metrics.UNKNOWN_ZIPS.inc(len(unknown))
        if not self._zip_warned:
            warning = truncated_zip_match(known, unknown)
            if warning:
                self._zip_warned = True
                self.log.warning("zip_codes_look_truncated", detail=warning)

    def _observe(self, scored: ScoredBatch, deadline: float) -> None:
        for runner in self.observe_hooks:
            try:
                runner.call("observe", scored, deadline)
            except HookTimeout as exc:
                metrics.HOOK_TIMEOUTS.labels(runner.name).inc()
                self.log.error("hook_timeout", hook=runner.name, error=str(exc))
            except Exception as exc:
                metrics.HOOK_ERRORS.labels(runner.name).inc()
                self.log.error("hook_failed", hook=runner.name, error=str(exc))

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
        # Fitted to what the producer and the topic accept: a dead letter that cannot be sent
        # would stop the loop on the very record it is about (consumer/deadletter.py).
        key, value, headers = fit_dead_letter(
            msg.key(), msg.value(),
            dead_letter_headers(msg, reason, error_class, message, self.worker_id),
            self.dead_letter_limit)
        self._produce(self.settings.dlq_topic, key, value, headers=headers)
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
