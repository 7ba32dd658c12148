"""The scoring step, with no broker in it: a batch of records in, what becomes of each out.

:class:`ScoringCore` takes a batch of :class:`Incoming` records: Avro bytes as they came off
Kafka (with their :class:`Source` coordinates), or already decoded orders (an HTTP request has
no coordinates), and returns an :class:`Outcome` that says, for every record, exactly one of:

* a prediction (:class:`Scored`: the ``prediction.avsc`` record and its key), plus a drift
  sample (:class:`Sample`) when the sampler picks the order;
* a dead letter (:class:`Rejected`: reason, error class, message), for a record that is too
  large, does not decode, fails a check hook (validation is the first), is not finished by the
  batch's deadline, or makes scoring fail;
* deferred: kept back, neither scored nor rejected (room for orders that wait until the
  reference data has caught up; nothing defers yet).

Per batch: size check, decode, the check hooks (under one deadline, see
:mod:`triage.consumer.hooks`), features for the whole batch, one ``predict``, the records, the
observe hooks. No Kafka client: the worker loop (:mod:`triage.consumer.scorer`) consumes, hands
the batch here, produces what comes back and commits; tests and other front doors call it
directly. Prometheus counters of predictions, dead letters, hook errors and unknown zips are
counted here, so every front door counts alike.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from triage.bus.clients import Source
from triage.bus.errors import BadRecord
from triage.consumer import metrics
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
from triage.model.artifact import Model
from triage.model.features import FeatureBatch
from triage.model.orders import OrderColumns
from triage.model.reference import ReferenceTables, truncated_zip_match
from triage.schemas.codec import Codec

Record = dict[str, Any]


class RecordTooLarge(BadRecord):
    """A record's key and value together exceed ``CoreConfig.max_message_bytes``."""

    def __init__(self, message: str) -> None:
        super().__init__("oversized", message)


@dataclass(frozen=True)
class Incoming:
    """One record to score: Avro bytes to decode (``None`` is a tombstone), or a decoded
    order (``order.avsc``'s fields)."""

    value: bytes | Mapping[str, Any] | None
    key: bytes | None = None
    source: Source | None = None


@dataclass(frozen=True)
class Scored:
    index: int       # position of the record in the batch
    key: bytes       # the order_id, UTF-8: predictions are keyed by order
    record: Record   # a prediction.avsc record


@dataclass(frozen=True)
class Sample:
    index: int
    key: bytes
    record: Record   # a drift_sample.avsc record


@dataclass(frozen=True)
class Rejected:
    index: int
    reason: str       # short, for machines: the dead-letter header and metric label
    error_class: str  # e.g. DecodeError, ValidationError, TimeoutError
    message: str      # for people


@dataclass
class Outcome:
    """What became of each record of a batch, by its position in the batch."""

    size: int
    predictions: list[Scored] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    dead_letters: list[Rejected] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)

    def settled(self) -> set[int]:
        """Positions with a prediction or a dead letter."""
        return {p.index for p in self.predictions} | {d.index for d in self.dead_letters}


@dataclass(frozen=True)
class CoreConfig:
    """The scorer settings the core needs (see bus/settings.py for each)."""

    max_message_bytes: int = 16_384   # key + value, before decoding
    sample_rate: float = 0.05
    deadline_s: float = 30.0          # hooks of one batch, together


class ScoringCore:
    """Score batches with ``model`` and ``reference``. ``checks`` run in order before scoring
    (validation first); hooks wrapped in a :class:`HookRunner` run under the batch's deadline,
    others inline. ``observers`` run after. ``clock`` gives UTC milliseconds."""

    def __init__(self, model: Model, reference: ReferenceTables, orders: Codec, *,
                 config: CoreConfig, checks: Sequence[CheckHook | HookRunner] = (),
                 observers: Sequence[HookRunner] = (),
                 clock: Callable[[], int] = lambda: int(time.time() * 1000),
                 log: Any = None) -> None:
        self.model = model
        self.reference = reference
        self.orders = orders
        self.config = config
        self.checks = list(checks)
        self.observers = list(observers)
        self.clock = clock
        self.class_names = [str(c) for c in model.classes]
        self.log = log or structlog.get_logger("core")
        self._zip_warned = False

    def process(self, batch: Sequence[Incoming]) -> Outcome:
        """Every record of ``batch`` ends in exactly one place of the returned Outcome.

        Raises only what is no record's fault: RegistryUnavailable (the Schema Registry is
        down), or a bug."""
        deadline = time.monotonic() + self.config.deadline_s
        outcome = Outcome(len(batch))
        positions: list[int] = []
        records: list[Record] = []
        for index, item in enumerate(batch):
            try:
                records.append(self._decode(item))
            except BadRecord as exc:
                self._reject(outcome, batch, index, exc.reason, type(exc).__name__, exc.message)
                continue
            positions.append(index)
        for hook in self.checks:
            positions, records = self._check(hook, outcome, batch, positions, records, deadline)
        if records:
            self._score(outcome, batch, positions, records, deadline)
        return outcome

    # -- decode and check ------------------------------------------------------------------

    def _decode(self, item: Incoming) -> Record:
        if item.value is not None and not isinstance(item.value, bytes | bytearray):
            return dict(item.value)
        size = len(item.value or b"") + len(item.key or b"")
        if size > self.config.max_message_bytes:
            raise RecordTooLarge(f"key and value {size} bytes, most allowed "
                                 f"{self.config.max_message_bytes}")
        return self.orders.decode(item.value)

    def _check(self, hook: CheckHook | HookRunner, outcome: Outcome, batch: Sequence[Incoming],
               positions: list[int], records: list[Record], deadline: float
               ) -> tuple[list[int], list[Record]]:
        """Run one check hook; reject what it rejects, and what it has not finished by
        ``deadline`` (monotonic seconds); return what it lets through."""
        if not records:
            return positions, records
        name = hook.name if isinstance(hook, HookRunner) else hook_name(hook)
        try:
            rejections = {r.index: r for r in _call_check(hook, records, deadline)}
        except HookTimeout as exc:
            rejections = self._timed_out(name, exc, range(len(records)))
        except Exception:
            metrics.HOOK_ERRORS.labels(name).inc()
            rejections = {}
            for index, record in enumerate(records):  # find the orders it fails on
                try:
                    rejections.update((index, r) for r in _call_check(hook, [record], deadline))
                except HookTimeout as exc:
                    rejections.update(self._timed_out(name, exc, range(index, len(records))))
                    break
                except Exception as exc:
                    rejections[index] = Rejection(index, "hook_failed",
                                                  f"{name}: {type(exc).__name__}: {exc}")
        for index, rejection in rejections.items():
            if 0 <= index < len(records):
                error_class = "TimeoutError" if rejection.reason == "timeout" \
                    else "ValidationError"
                self._reject(outcome, batch, positions[index], rejection.reason, error_class,
                             rejection.message)
        kept = [i for i in range(len(records)) if i not in rejections]
        return [positions[i] for i in kept], [records[i] for i in kept]

    def _timed_out(self, name: str, exc: HookTimeout, indices: range) -> dict[int, Rejection]:
        metrics.HOOK_TIMEOUTS.labels(name).inc()
        self.log.error("hook_timeout", hook=name, orders=len(indices), error=str(exc))
        return {i: Rejection(i, "timeout", str(exc)) for i in indices}

    # -- score -----------------------------------------------------------------------------

    def _score(self, outcome: Outcome, batch: Sequence[Incoming], positions: list[int],
               records: list[Record], deadline: float) -> None:
        orders = OrderColumns.from_records(records)
        try:
            features = orders.features(self.reference)
            recommendations, proba = self.model.predict(features)
        except Exception as exc:
            if len(records) > 1:  # find the record(s) to blame; the rest are scored as usual
                for i, (position, record) in enumerate(zip(positions, records, strict=True)):
                    if time.monotonic() > deadline:
                        for late in positions[i:]:
                            self._reject(outcome, batch, late, "timeout", "TimeoutError",
                                         "not scored within the processing deadline while "
                                         "the batch was re-scored order by order")
                        return
                    self._score(outcome, batch, [position], [record], deadline)
                return
            self._reject(outcome, batch, positions[0], "scoring_failed", type(exc).__name__,
                         str(exc))
            return
        self._count_unknown_zips(orders.zip_code)
        scored_at = self.clock()
        labels = recommendations.tolist()
        published = [self._published_at(batch[p], scored_at) for p in positions]
        self._records(outcome, batch, positions, orders, features, labels, proba.tolist(),
                      scored_at)
        if self.observers:
            scored = ScoredBatch(orders, features, labels, proba, published, scored_at)
            for runner in self.observers:
                try:
                    runner.call("observe", scored, deadline)
                except HookTimeout as exc:
                    metrics.HOOK_TIMEOUTS.labels(runner.name).inc()
                    self.log.error("hook_timeout", hook=runner.name, error=str(exc))
                except Exception as exc:
                    metrics.HOOK_ERRORS.labels(runner.name).inc()
                    self.log.error("hook_failed", hook=runner.name, error=str(exc))

    @staticmethod
    def _published_at(item: Incoming, scored_at: int) -> int:
        return item.source.timestamp_ms if item.source is not None else scored_at

    def _records(self, outcome: Outcome, batch: Sequence[Incoming], positions: list[int],
                 orders: OrderColumns, features: FeatureBatch, recommendations: list[str],
                 proba: list[list[float]], scored_at: int) -> None:
        """The prediction of every scored order, and the drift samples."""
        version = self.model.version
        classes = self.class_names
        timestamps = orders.timestamp_ms.tolist()
        feature_records = features.records()
        for i, position in enumerate(positions):
            source = batch[position].source
            outcome.predictions.append(Scored(position, orders.order_id[i].encode(), {
                "order_id": orders.order_id[i],
                "customer_id": orders.customer_id[i],
                "recommendation": recommendations[i],
                "probabilities": dict(zip(classes, proba[i], strict=True)),
                "model_version": version,
                "features": feature_records[i],
                "order_timestamp_ms": timestamps[i],
                "scored_at_ms": scored_at,
                # Lineage; an order that did not come from Kafka has none (-1).
                "order_published_at_ms": source.timestamp_ms if source else scored_at,
                "order_partition": source.partition if source else -1,
                "order_offset": source.offset if source else -1,
            }))
        for recommendation, count in Counter(recommendations).items():
            metrics.PREDICTIONS.labels(recommendation).inc(count)

        for i in sampled_indices(orders.order_id, self.config.sample_rate):
            outcome.samples.append(Sample(positions[i], orders.order_id[i].encode(), {
                "order": {"order_id": orders.order_id[i], "customer_id": orders.customer_id[i],
                          "timestamp_ms": timestamps[i], "sku_code": orders.sku_code[i],
                          "zip_code": orders.zip_code[i]},
                "features": feature_records[i],
                "recommendation": recommendations[i],
                "probabilities": dict(zip(classes, proba[i], strict=True)),
                "model_version": version,
                "scored_at_ms": scored_at,
            }))

    def _count_unknown_zips(self, zip_codes: list[str]) -> None:
        """Count orders to zips the reference data does not know (scored as not served), and
        warn once if they look like reference zips that lost their leading zeros."""
        known = self.reference.zips.keys()
        unknown = [z for z in zip_codes if z not in known]
        if not unknown:
            return
        metrics.UNKNOWN_ZIPS.inc(len(unknown))
        if not self._zip_warned:
            warning = truncated_zip_match(known, unknown)
            if warning:
                self._zip_warned = True
                self.log.warning("zip_codes_look_truncated", detail=warning)

    def _reject(self, outcome: Outcome, batch: Sequence[Incoming], index: int, reason: str,
                error_class: str, message: str) -> None:
        outcome.dead_letters.append(Rejected(index, reason, error_class, message))
        metrics.DEAD_LETTERS.labels(reason).inc()
        source = batch[index].source
        self.log.warning("dead_lettered", reason=reason, error=message[:200],
                         partition=source.partition if source else None,
                         offset=source.offset if source else None)


def _call_check(hook: CheckHook | HookRunner, records: list[Record], deadline: float
                ) -> list[Rejection]:
    if isinstance(hook, HookRunner):
        return hook.call("check", records, deadline) or []
    return list(hook.check(records))


def split_hooks(hooks: Sequence[object]) -> tuple[list[HookRunner], list[HookRunner]]:
    """User hooks (TRIAGE_HOOKS) as runners: (check hooks, observe hooks)."""
    runners = [HookRunner(h) for h in hooks]
    return ([r for r in runners if isinstance(r.hook, CheckHook)],
            [r for r in runners if isinstance(r.hook, ObserveHook)])
