"""The scoring step, with no broker in it: a batch of records in, what becomes of each out.

:class:`ScoringCore` takes a batch of :class:`Incoming` records: Avro bytes as they came off
Kafka (with their :class:`Source` coordinates), or already decoded orders (an HTTP request has
no coordinates), and returns an :class:`Outcome` that says, for every record, exactly one of:

* a prediction (:class:`Scored`: the ``prediction.avsc`` record and its key), plus a drift
  sample (:class:`Sample`) when the sampler picks the order;
* a dead letter (:class:`Rejected`: reason, error class, message), for a record that is too
  large, does not decode, fails a check hook (validation is the first), is not finished by the
  batch's deadline, or makes scoring fail;
* deferred: held back until the reference streams have passed the order's time (the
  ``gate``, consumer/reference.py); the core keeps it and scores it in a later call, flagged
  ``reference_wait_expired`` if the maximum wait ran out first.

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
from typing import Any, NamedTuple, Protocol

import numpy as np
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


# The per-record types below are NamedTuples, not frozen dataclasses: one of each is made per
# order on the hot path, and a NamedTuple is made in a quarter of the time (0.4 against 1.5 us).

class Incoming(NamedTuple):
    """One record to score: Avro bytes to decode (``None`` is a tombstone), or a decoded
    order (``order.avsc``'s fields)."""

    value: bytes | Mapping[str, Any] | None
    key: bytes | None = None
    source: Source | None = None


class Scored(NamedTuple):
    item: Incoming   # the record scored
    key: bytes       # the order_id, UTF-8: predictions are keyed by order
    record: Record   # a prediction.avsc record


class Sample(NamedTuple):
    item: Incoming
    key: bytes
    record: Record   # a drift_sample.avsc record


class Rejected(NamedTuple):
    item: Incoming
    reason: str       # short, for machines: the dead-letter header and metric label
    error_class: str  # e.g. DecodeError, ValidationError, TimeoutError
    message: str      # for people


@dataclass
class Outcome:
    """What became of the records of one :meth:`ScoringCore.process` call: those of its batch,
    and those of earlier batches that waited and are now scored."""

    size: int                                                    # records in the batch
    predictions: list[Scored] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    dead_letters: list[Rejected] = field(default_factory=list)
    deferred: list[Incoming] = field(default_factory=list)       # of the batch, now waiting
    expired: int = 0  # orders scored because the reference wait ran out
    shadow_predictions: list[Scored] = field(default_factory=list)  # by the shadow model


@dataclass(frozen=True)
class CoreConfig:
    """The scorer settings the core needs (see bus/settings.py for each)."""

    max_message_bytes: int = 16_384   # key + value, before decoding
    sample_rate: float = 0.05
    deadline_s: float = 30.0          # hooks of one batch, together


class Gate(Protocol):
    """Decides when an order may be scored (consumer/reference.py: the event-time rule)."""

    def admit(self, partitions: np.ndarray, timestamps_ms: np.ndarray, waited_s: np.ndarray,
              now: float) -> tuple[np.ndarray, np.ndarray]:
        """(ready, expired) bool arrays: score now, or score now because the wait ran out."""

    def scored(self, partitions: np.ndarray, timestamps_ms: np.ndarray) -> None:
        """These orders were scored."""


class _Waiting(NamedTuple):
    item: Incoming
    record: Record
    since: float  # monotonic seconds when it was first held


class ScoringCore:
    """Score batches with ``model`` and ``reference``. ``checks`` run in order before scoring
    (validation first); hooks wrapped in a :class:`HookRunner` run under the batch's deadline,
    others inline. ``observers`` run after. ``gate``: when orders may be scored; without one,
    at once. ``clock`` gives UTC milliseconds, ``monotonic`` seconds."""

    def __init__(self, model: Model, reference: ReferenceTables, orders: Codec, *,
                 config: CoreConfig, checks: Sequence[CheckHook | HookRunner] = (),
                 observers: Sequence[HookRunner] = (), gate: Gate | None = None,
                 clock: Callable[[], int] = lambda: int(time.time() * 1000),
                 monotonic: Callable[[], float] = time.monotonic, log: Any = None) -> None:
        self.model = model
        self.shadow: Model | None = None  # scored beside ``model``, published apart
        # (active version, shadow version) -> [orders both scored, on which they agreed]
        self._shadow_tally: tuple[tuple[str, str], list[int]] = (("", ""), [0, 0])
        self.reference = reference
        self.orders = orders
        self.config = config
        self.checks = list(checks)
        self.observers = list(observers)
        self.gate = gate
        self.clock = clock
        self.monotonic = monotonic
        self.class_names = [str(c) for c in model.classes]
        self.log = log or structlog.get_logger("core")
        self._zip_warned = False
        # Orders that passed their checks and wait for the reference streams, by partition.
        self.waiting: dict[int, list[_Waiting]] = {}

    def process(self, batch: Sequence[Incoming]) -> Outcome:
        """Every record of ``batch`` ends in exactly one place of the returned Outcome (or
        waits, in ``deferred``, to be scored by a later call); waiting orders from earlier
        calls that are now ready are scored too. Call it with an empty batch to score those.

        Raises only what is no record's fault: RegistryUnavailable (the Schema Registry is
        down), or a bug."""
        now = self.monotonic()
        deadline = now + self.config.deadline_s
        outcome = Outcome(len(batch))
        items: list[Incoming] = []
        records: list[Record] = []
        for item in batch:
            try:
                records.append(self._decode(item))
            except BadRecord as exc:
                self._reject(outcome, item, exc.reason, type(exc).__name__, exc.message)
                continue
            items.append(item)
        for hook in self.checks:
            items, records = self._check(hook, outcome, items, records, deadline)
        held = [w for waiting in self.waiting.values() for w in waiting]
        held += [_Waiting(item, record, now) for item, record in zip(items, records,
                                                                      strict=True)]
        if held:
            self._admit(outcome, held, now, deadline, fresh=len(items))
        return outcome

    def _admit(self, outcome: Outcome, held: list[_Waiting], now: float, deadline: float,
               fresh: int) -> None:
        """Score what the gate lets through; keep the rest waiting."""
        if self.gate is None:
            ready, expired = np.ones(len(held), dtype=bool), np.zeros(len(held), dtype=bool)
        else:
            partitions = np.fromiter((_partition(w.item) for w in held), np.int64, len(held))
            timestamps = np.fromiter((w.record["timestamp_ms"] for w in held), np.int64,
                                     len(held))
            waited = np.fromiter((now - w.since for w in held), np.float64, len(held))
            ready, expired = self.gate.admit(partitions, timestamps, waited, now)
        go = ready | expired
        self.waiting = {}
        for w, keep in zip(held, (~go).tolist(), strict=True):
            if keep:
                self.waiting.setdefault(_partition(w.item), []).append(w)
        first_fresh = len(held) - fresh  # the batch's own orders come last in ``held``
        outcome.deferred = [w.item for w, keep in zip(held[first_fresh:],
                                                      (~go)[first_fresh:].tolist(), strict=True)
                            if keep]
        metrics.WAITING_ORDERS.set(sum(len(w) for w in self.waiting.values()))
        if go.any():
            rows = np.flatnonzero(go).tolist()
            self._score(outcome, [held[i].item for i in rows], [held[i].record for i in rows],
                        expired[rows], deadline)

    def drop(self, partitions: Sequence[int]) -> int:
        """Forget the waiting orders of revoked partitions (uncommitted: their new owner reads
        them); returns how many."""
        dropped = sum(len(self.waiting.pop(p, [])) for p in partitions)
        metrics.WAITING_ORDERS.set(sum(len(w) for w in self.waiting.values()))
        return dropped

    def waiting_offsets(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> the lowest offset of an order still waiting there: offsets
        from it on must not be committed."""
        lowest: dict[tuple[str, int], int] = {}
        for waiting in self.waiting.values():
            for w in waiting:
                source = w.item.source
                if source is not None:
                    key = (source.topic, source.partition)
                    lowest[key] = min(lowest.get(key, source.offset), source.offset)
        return lowest

    def waiting_counts(self) -> dict[int, int]:
        """Partition -> orders waiting there."""
        return {p: len(w) for p, w in self.waiting.items() if w}

    # -- decode and check ------------------------------------------------------------------

    def _decode(self, item: Incoming) -> Record:
        if item.value is not None and not isinstance(item.value, bytes | bytearray):
            return dict(item.value)
        size = len(item.value or b"") + len(item.key or b"")
        if size > self.config.max_message_bytes:
            raise RecordTooLarge(f"key and value {size} bytes, most allowed "
                                 f"{self.config.max_message_bytes}")
        return self.orders.decode(item.value)

    def _check(self, hook: CheckHook | HookRunner, outcome: Outcome, items: list[Incoming],
               records: list[Record], deadline: float) -> tuple[list[Incoming], list[Record]]:
        """Run one check hook; reject what it rejects, and what it has not finished by
        ``deadline`` (monotonic seconds); return what it lets through."""
        if not records:
            return items, records
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
                self._reject(outcome, items[index], rejection.reason, error_class,
                             rejection.message)
        kept = [i for i in range(len(records)) if i not in rejections]
        return [items[i] for i in kept], [records[i] for i in kept]

    def _timed_out(self, name: str, exc: HookTimeout, indices: range) -> dict[int, Rejection]:
        metrics.HOOK_TIMEOUTS.labels(name).inc()
        self.log.error("hook_timeout", hook=name, orders=len(indices), error=str(exc))
        return {i: Rejection(i, "timeout", str(exc)) for i in indices}

    # -- score -----------------------------------------------------------------------------

    def _score(self, outcome: Outcome, items: list[Incoming], records: list[Record],
               expired: np.ndarray, deadline: float) -> None:
        orders = OrderColumns.from_records(records)
        partitions = np.fromiter((_partition(i) for i in items), np.int64, len(items))
        try:
            features = orders.features(self.reference, partitions)
            recommendations, proba = self.model.predict(features)
        except Exception as exc:
            if len(records) > 1:  # find the record(s) to blame; the rest are scored as usual
                for i, (item, record) in enumerate(zip(items, records, strict=True)):
                    if self.monotonic() > deadline:
                        for late in items[i:]:
                            self._reject(outcome, late, "timeout", "TimeoutError",
                                         "not scored within the processing deadline while "
                                         "the batch was re-scored order by order")
                        return
                    self._score(outcome, [item], [record], expired[i:i + 1], deadline)
                return
            self._reject(outcome, items[0], "scoring_failed", type(exc).__name__, str(exc))
            return
        if self.gate is not None:
            self.gate.scored(partitions, orders.timestamp_ms)
        if expired.any():
            outcome.expired += int(expired.sum())
            metrics.REFERENCE_WAIT_EXPIRED.inc(int(expired.sum()))
        self._count_unknown_zips(orders.zip_code)
        scored_at = self.clock()
        labels = recommendations.tolist()
        self._records(outcome, items, orders, features, labels, proba.tolist(),
                      expired.tolist(), scored_at)
        if self.shadow is not None:
            self._shadow(outcome, items, orders, features, labels, expired.tolist(), scored_at)
        if self.observers:
            published = [self._published_at(item, scored_at) for item in items]
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

    def _shadow(self, outcome: Outcome, items: list[Incoming], orders: OrderColumns,
                features: FeatureBatch, active: list[str], expired: list[bool],
                scored_at: int) -> None:
        """The shadow model's predictions of the same orders, from the same features: one more
        predict call per batch. A failure costs the shadow predictions, never the batch."""
        shadow = self.shadow
        assert shadow is not None
        try:
            recommendations, proba = shadow.predict(features)
        except Exception as exc:
            metrics.SHADOW_ERRORS.inc()
            self.log.error("shadow_scoring_failed", version=shadow.version, error=str(exc))
            return
        labels = recommendations.tolist()
        scored = Outcome(len(items))
        self._records(scored, items, orders, features, labels, proba.tolist(), expired,
                      scored_at, model=shadow, shadow=True)
        outcome.shadow_predictions = scored.predictions
        agreed = sum(a == b for a, b in zip(active, labels, strict=True))
        metrics.SHADOW_PREDICTIONS.inc(len(labels))
        metrics.SHADOW_AGREEMENTS.inc(agreed)
        pair = (self.model.version, shadow.version)
        if self._shadow_tally[0] != pair:  # a new pair: its own agreement from zero
            self._shadow_tally = (pair, [0, 0])
        tally = self._shadow_tally[1]
        tally[0] += len(labels)
        tally[1] += agreed
        metrics.SHADOW_AGREEMENT.set(tally[1] / tally[0])

    @staticmethod
    def _published_at(item: Incoming, scored_at: int) -> int:
        return item.source.timestamp_ms if item.source is not None else scored_at

    def _records(self, outcome: Outcome, items: list[Incoming], orders: OrderColumns,
                 features: FeatureBatch, recommendations: list[str],
                 proba: list[list[float]], expired: list[bool], scored_at: int,
                 model: Model | None = None, shadow: bool = False) -> None:
        """The prediction of every scored order, and the drift samples (not for the shadow
        model's predictions, which count in no metric but the shadow's)."""
        version = (model or self.model).version
        classes = [str(c) for c in model.classes] if model is not None else self.class_names
        timestamps = orders.timestamp_ms.tolist()
        feature_records = features.records()
        probabilities = [dict(zip(classes, p, strict=True)) for p in proba]
        keys = [order_id.encode() for order_id in orders.order_id]
        predictions = outcome.predictions
        # One loop over columns, no indexing: this builds a record per order on the hot path.
        for item, key, order_id, customer_id, recommendation, probability, feature_record, \
                timestamp, was_expired in zip(items, keys, orders.order_id, orders.customer_id,
                                              recommendations, probabilities, feature_records,
                                              timestamps, expired, strict=True):
            source = item.source
            predictions.append(Scored(item, key, {
                "order_id": order_id,
                "customer_id": customer_id,
                "recommendation": recommendation,
                "probabilities": probability,
                "model_version": version,
                "features": feature_record,
                "order_timestamp_ms": timestamp,
                "scored_at_ms": scored_at,
                # Lineage; an order that did not come from Kafka has none (-1).
                "order_published_at_ms": source.timestamp_ms if source else scored_at,
                "order_partition": source.partition if source else -1,
                "order_offset": source.offset if source else -1,
                "reference_wait_expired": was_expired,
            }))
        if shadow:
            return
        for recommendation, count in Counter(recommendations).items():
            metrics.PREDICTIONS.labels(recommendation).inc(count)

        for i in sampled_indices(orders.order_id, self.config.sample_rate):
            outcome.samples.append(Sample(items[i], keys[i], {
                "order": {"order_id": orders.order_id[i], "customer_id": orders.customer_id[i],
                          "timestamp_ms": timestamps[i], "sku_code": orders.sku_code[i],
                          "zip_code": orders.zip_code[i]},
                "features": feature_records[i],  # shared with the prediction: both read-only
                "recommendation": recommendations[i],
                "probabilities": probabilities[i],
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

    def _reject(self, outcome: Outcome, item: Incoming, reason: str, error_class: str,
                message: str) -> None:
        outcome.dead_letters.append(Rejected(item, reason, error_class, message))
        metrics.DEAD_LETTERS.labels(reason).inc()
        source = item.source
        self.log.warning("dead_lettered", reason=reason, error=message[:200],
                         partition=source.partition if source else None,
                         offset=source.offset if source else None)


def _partition(item: Incoming) -> int:
    """The orders partition a record was read from; -1 for one read from no partition."""
    return item.source.partition if item.source is not None else -1


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
