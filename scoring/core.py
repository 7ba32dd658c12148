"""The scoring step, with no broker in it: a batch of records in, what becomes of each out.

:class:`ScoringCore` takes a batch of :class:`Incoming` records: Avro bytes as they came off
Kafka (with their :class:`Source` coordinates), or already decoded orders (an HTTP request has
no coordinates), and returns an :class:`Outcome` that says, for every record, exactly one of:

* a prediction (:class:`Scored`: the ``prediction.avsc`` record and its key), plus a drift
  sample (:class:`Sample`) when the sampler picks the order. The core builds a call's
  predictions as columns (:class:`ScoredColumns`), which the worker encodes as they are
  (``Codec.encode_columns``: no record dict per order on the hot path); ``Outcome.predictions``
  builds the records from them for whoever reads them (the HTTP door, tests);
* a dead letter (:class:`Rejected`: reason, error class, message), for a record that is too
  large, does not decode, fails a check hook (validation is the first), is not finished by the
  batch's deadline, or makes scoring fail;
* deferred: held back until the reference streams have passed the order's time (the
  ``gate``, scoring/feed.py); the core keeps it and scores it in a later call, flagged
  ``reference_wait_expired`` if the maximum wait ran out first.

With ``retained`` (scoring/corrections.py) the core also keeps what it published for each order
and publishes corrected revisions: :meth:`ScoringCore.correct` for late reference events,
:meth:`ScoringCore.verify` for orders read back from the predictions topic, and an order record
read again is published again only if its features changed.

Per batch: size check, decode, the check hooks (under one deadline, see
:mod:`triage.scoring.hooks`), features for the whole batch, one ``predict``, the records, the
observe hooks. No Kafka client: the worker loop (:mod:`triage.consumer.scorer`) consumes, hands
the batch here, produces what comes back and commits; tests and other front doors call it
directly. Prometheus counters of predictions, dead letters, hook errors and unknown zips are
counted here, so every front door counts alike.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import structlog

from triage.bus.clients import Source
from triage.bus.errors import BadRecord
from triage.model.artifact import Model
from triage.model.features import FEATURE_NAMES, WINDOWED_NAMES, FeatureBatch, compute_features
from triage.model.orders import OrderColumns
from triage.model.reference import ReferenceTables, truncated_zip_match
from triage.schemas.codec import Codec
from triage.schemas.compiled import Constant, MapMatrix, column_rows
from triage.scoring import metrics
from triage.scoring.corrections import (
    Kept,
    RetainedOrders,
    changed_streams,
    revision_reason,
)
from triage.scoring.feed import LateEvent
from triage.scoring.hooks import (
    CheckHook,
    HookRunner,
    HookTimeout,
    ObserveHook,
    Rejection,
    ScoredBatch,
    hook_name,
)
from triage.scoring.sampling import sampled_indices
from triage.scoring.settings import CoreSettings
from triage.scoring.windowed import NOT_JOINED, WAIT_EXPIRED, WINDOW_EXPIRED, WindowedJoin
from triage.scoring.windowed import STREAM as WINDOWED_STREAM

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


class ScoredColumns(NamedTuple):
    """The predictions of one predict call as columns: ``columns`` maps each field of
    ``prediction.avsc`` to a list of ``size`` values, a Constant (the model version, the
    scoring time; the revision fields when every order is a revision 1) or, for
    ``probabilities``, a MapMatrix over the model's float32 probabilities; ``features`` to the
    features' own columns (schemas/compiled.py). ``items[i]`` and ``keys[i]`` (the order_id,
    UTF-8) are those of prediction ``i``."""

    items: list[Incoming]
    keys: list[bytes]
    columns: dict[str, Any]
    size: int

    def scored(self) -> list[Scored]:
        """The predictions as records (``column_rows``)."""
        return [Scored(item, key, record) for item, key, record in zip(
            self.items, self.keys, column_rows(self.columns, self.size), strict=True)]


class Sample(NamedTuple):
    item: Incoming
    key: bytes
    record: Record   # a drift_sample.avsc record


class Correction(NamedTuple):
    """A revised prediction of an order scored before (revision 2 and up)."""

    key: bytes        # the order_id, UTF-8
    record: Record    # a prediction.avsc record
    partition: int    # the orders partition the order was read from


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
    scored: list[ScoredColumns] = field(default_factory=list)    # the predictions
    samples: list[Sample] = field(default_factory=list)
    dead_letters: list[Rejected] = field(default_factory=list)
    deferred: list[Incoming] = field(default_factory=list)       # of the batch, now waiting
    expired: int = 0  # orders scored because the reference wait ran out
    windowed_expired: int = 0  # orders scored before the feature stage answered (wait_expired)
    shadow_scored: list[ScoredColumns] = field(default_factory=list)  # by the shadow model
    republished: int = 0  # orders read again whose last revision still holds: nothing new

    @property
    def predictions(self) -> list[Scored]:
        """The predictions as records, in order (built from ``scored`` at each call)."""
        return [p for batch in self.scored for p in batch.scored()]

    @property
    def shadow_predictions(self) -> list[Scored]:
        """The shadow model's predictions as records (built from ``shadow_scored``)."""
        return [p for batch in self.shadow_scored for p in batch.scored()]

    @property
    def predicted(self) -> int:
        """How many predictions (without building them)."""
        return sum(batch.size for batch in self.scored)


@dataclass(frozen=True)
class CoreConfig:
    """The scorer settings the core needs (see bus/settings.py for each)."""

    max_message_bytes: int = 16_384   # key + value, before decoding
    sample_rate: float = 0.05
    deadline_s: float = 30.0          # hooks of one batch, together


def core_config(core: CoreSettings) -> CoreConfig:
    """The core's configuration from its settings (TRIAGE_MAX_MESSAGE_BYTES,
    TRIAGE_SAMPLE_RATE, TRIAGE_PROCESSING_DEADLINE_MS), for the worker and the gateway alike."""
    return CoreConfig(max_message_bytes=core.max_message_bytes,
                      sample_rate=core.sample_rate,
                      deadline_s=core.processing_deadline_ms / 1000.0)


class Gate(Protocol):
    """Decides when an order may be scored (scoring/feed.py: the event-time rule)."""

    def admit(self, timestamps_ms: np.ndarray, published_ms: np.ndarray, waited_s: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """(ready, expired) bool arrays for orders at ``timestamps_ms``, published at
        ``published_ms`` (UTC ms), consumed ``waited_s`` ago: score now, or score now because
        the wait ran out."""

    def scored(self, timestamps_ms: np.ndarray) -> None:
        """Orders at these times (UTC ms) were scored."""


class _Waiting(NamedTuple):
    item: Incoming
    record: Record
    since: float      # monotonic seconds when it was first held
    published: int    # the order record's Kafka timestamp (UTC ms); an order from no topic: its
    # own time


class ScoringCore:
    """Score batches with ``model`` and ``reference``. ``checks`` run in order before scoring
    (validation first); hooks wrapped in a :class:`HookRunner` run under the batch's deadline,
    others inline. ``observers`` run after. ``gate``: when orders may be scored; without one,
    at once. ``retained``: the orders kept for corrections (module docstring); without, every
    prediction is revision 1. ``clock`` gives UTC milliseconds, ``monotonic`` seconds."""

    def __init__(self, model: Model, reference: ReferenceTables, orders: Codec, *,
                 config: CoreConfig, checks: Sequence[CheckHook | HookRunner] = (),
                 observers: Sequence[HookRunner] = (), gate: Gate | None = None,
                 retained: RetainedOrders | None = None,
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
        # The feature stage's answers (scoring/windowed.py), for a model that reads windowed
        # features; None: they are not joined (null in the predictions).
        self.windowed: WindowedJoin | None = None
        self.retained = retained
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
        held += [_Waiting(item, record, now, item.source.timestamp_ms if item.source is not None
                          else record["timestamp_ms"])
                 for item, record in zip(items, records, strict=True)]
        if self.retained is not None:
            self.retained.expire(self.clock())
        if held:
            self._admit(outcome, held, now, deadline, fresh=len(items))
        return outcome

    def _admit(self, outcome: Outcome, held: list[_Waiting], now: float, deadline: float,
               fresh: int) -> None:
        """Score what the gate (and the windowed join) let through; keep the rest waiting."""
        waited = np.fromiter((now - w.since for w in held), np.float64, len(held))
        if self.gate is None:
            ready, expired = np.ones(len(held), dtype=bool), np.zeros(len(held), dtype=bool)
        else:
            timestamps = np.fromiter((w.record["timestamp_ms"] for w in held), np.int64,
                                     len(held))
            published = np.fromiter((w.published for w in held), np.int64, len(held))
            ready, expired = self.gate.admit(timestamps, published, waited)
        go = ready | expired
        if self.windowed is not None and self.windowed.entities:
            answered, gave_up = self.windowed.admit([w.record for w in held], waited)
            go &= answered | gave_up
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
        joined = self.windowed.lookup(records) if self.windowed is not None else None
        try:
            features = compute_features(self.reference, orders.order_id, orders.sku_code,
                                        orders.zip_code, orders.timestamp_ms,
                                        joined.values if joined is not None else None)
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
            self.gate.scored(orders.timestamp_ms)
        unknown = joined.unknown if joined is not None else [{} for _ in records]
        # What a model reads that no join gives (the HTTP door has none): unknown.
        unjoined = sorted({*self.model.windowed, *(self.shadow.windowed if self.shadow else ())}
                          - set(self.windowed.names if self.windowed is not None else ()))
        for row in unknown if unjoined else ():
            row.update(dict.fromkeys(unjoined, NOT_JOINED))
        if self.windowed is not None:
            self.windowed.scored(orders.timestamp_ms)
            waits = sum(WAIT_EXPIRED in u.values() for u in unknown)
            if waits:
                outcome.windowed_expired += waits
                metrics.WINDOWED_WAIT_EXPIRED.inc(waits)
        if expired.any():
            outcome.expired += int(expired.sum())
            metrics.REFERENCE_WAIT_EXPIRED.inc(int(expired.sum()))
        self._count_unknown_zips(orders.zip_code)
        scored_at = self.clock()
        labels = recommendations.tolist()
        self._records(outcome, items, orders, features, labels, proba, expired.tolist(),
                      scored_at, unknown)
        if self.shadow is not None:
            self._shadow(outcome, items, orders, features, labels, expired.tolist(), scored_at,
                         unknown)
        if self.observers:
            published = [self._published_at(item, scored_at) for item in items]
            # Copies: the prediction columns share these lists and this array, and a hook
            # (maybe still running in an abandoned thread) must not change what is published.
            own = dataclasses.replace(
                orders, order_id=list(orders.order_id), customer_id=list(orders.customer_id),
                sku_code=list(orders.sku_code), zip_code=list(orders.zip_code),
                timestamp_ms=orders.timestamp_ms.copy())
            scored = ScoredBatch(own, features, list(labels), proba.copy(), published,
                                 scored_at)
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
                scored_at: int, unknown: list[dict[str, str]]) -> None:
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
        self._records(scored, items, orders, features, labels, proba, expired, scored_at,
                      unknown, model=shadow, shadow=True)
        outcome.shadow_scored += scored.scored  # the blame path scores order by order
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
                 features: FeatureBatch, recommendations: list[str], proba: np.ndarray,
                 expired: list[bool], scored_at: int, unknown: list[dict[str, str]],
                 model: Model | None = None, shadow: bool = False) -> None:
        """The predictions of every scored order, as columns (:class:`ScoredColumns`), and
        the drift samples (not for the shadow model's predictions, which count in no metric
        but the shadow's). ``proba``: (orders, classes) probabilities; ``unknown``: per order,
        the windowed features whose value is unknown, and why. With ``retained``,
        each order's revision follows what was published for it before (module docstring),
        and the batch is kept for corrections."""
        version = (model or self.model).version
        classes = [str(c) for c in model.classes] if model is not None else self.class_names
        timestamps = orders.timestamp_ms.tolist()
        keys = [order_id.encode() for order_id in orders.order_id]
        n = len(items)
        revisions: list[int] = [1] * n
        reasons: list[str | None] = [None] * n
        publish = [True] * n
        if not shadow and self.retained is not None:
            self._revisions(items, orders, features, revisions, reasons, publish)
        feature_columns = features.avro_columns()
        published_ms, partitions, offsets = [], [], []
        for item in items:  # lineage; an order that did not come from Kafka has none (-1)
            source = item.source
            if source is None:
                published_ms.append(scored_at)
                partitions.append(-1)
                offsets.append(-1)
            else:
                published_ms.append(source.timestamp_ms)
                partitions.append(source.partition)
                offsets.append(source.offset)
        revised = revisions.count(1) != n or reasons.count(None) != n
        columns: dict[str, Any] = {
            "order_id": orders.order_id,
            "customer_id": orders.customer_id,
            "recommendation": recommendations,
            "probabilities": MapMatrix(tuple(classes), proba),
            "model_version": Constant(version),
            "features": feature_columns,
            "order_timestamp_ms": timestamps,
            "scored_at_ms": Constant(scored_at),
            "order_published_at_ms": published_ms,
            "order_partition": partitions,
            "order_offset": offsets,
            "reference_wait_expired": expired,
            "revision": revisions if revised else Constant(1),
            "revision_reason": reasons if revised else Constant(None),
            "sku_code": orders.sku_code,
            "zip_code": orders.zip_code,
            "windowed_unknown": unknown if any(unknown) else Constant({}),
        }
        if publish.count(True) == n:
            outcome.scored.append(ScoredColumns(items, keys, columns, n))
        else:
            rows = [i for i, new in enumerate(publish) if new]
            outcome.scored.append(ScoredColumns(
                [items[i] for i in rows], [keys[i] for i in rows], _take(columns, rows),
                len(rows)))
        if shadow:
            return
        if self.retained is not None:
            self._keep(orders, features, recommendations, expired, revisions, publish,
                       scored_at, partitions, offsets, published_ms, unknown)
        for recommendation, count in Counter(recommendations).items():
            metrics.PREDICTIONS.labels(recommendation).inc(count)

        for i in sampled_indices(orders.order_id, self.config.sample_rate):
            if not publish[i]:
                continue
            outcome.samples.append(Sample(items[i], keys[i], {
                "order": {"order_id": orders.order_id[i], "customer_id": orders.customer_id[i],
                          "timestamp_ms": timestamps[i], "sku_code": orders.sku_code[i],
                          "zip_code": orders.zip_code[i]},
                "features": {name: column[i] for name, column in feature_columns.items()},
                "recommendation": recommendations[i],
                "probabilities": dict(zip(classes, proba[i].tolist(), strict=True)),
                "model_version": version,
                "scored_at_ms": scored_at,
                "sample_rate": self.config.sample_rate,  # the report states what was sampled
            }))
        outcome.republished += publish.count(False)

    def _revisions(self, items: list[Incoming], orders: OrderColumns, features: FeatureBatch,
                   revisions: list[int], reasons: list[str | None], publish: list[bool]
                   ) -> None:
        """Fill in the revision of each order scored: 1 for an order not kept; for an order
        record read again (its partition and offset are those of the kept row), nothing new if
        its features still hold, else the next revision; for another record of a kept order,
        the next revision."""
        retained = self.retained
        assert retained is not None
        index = retained.index
        if not any(map(index.__contains__, orders.order_id)):
            return  # the usual case: none of these orders was published before
        found = [(i, prior) for i, prior in enumerate(map(retained.latest, orders.order_id))
                 if prior is not None]
        changed = changed_streams(
            FeatureBatch(**{name: np.array([kept.features.columns[name][row]
                                            for _, (kept, row) in found], dtype=column.dtype)
                            for name, column in features.columns.items()}),
            features.take(np.array([i for i, _ in found])))
        for (i, (kept, row)), streams in zip(found, changed, strict=True):
            source = items[i].source
            again = source is not None and source.partition == kept.partition \
                and source.offset == int(kept.offset[row])
            if again and not streams:
                publish[i] = False  # what is out still holds
                kept.verified[row] = True
                continue
            revisions[i] = int(kept.revision[row]) + 1
            reasons[i] = revision_reason(streams) if streams else "order_again"

    def _keep(self, orders: OrderColumns, features: FeatureBatch, recommendations: list[str],
              expired: list[bool], revisions: list[int], publish: list[bool], scored_at: int,
              partitions: list[int], offsets: list[int], published_ms: list[int],
              unknown: list[dict[str, str]]) -> None:
        """Keep the published orders read from Kafka (``partitions``, ``offsets`` and
        ``published_ms``: each order's lineage, partition -1 for one from no topic;
        ``unknown``: each order's unknown windowed features), a batch per orders
        partition."""
        retained = self.retained
        assert retained is not None
        partition_of = np.asarray(partitions, dtype=np.int64)
        rows = np.flatnonzero(np.asarray(publish, dtype=bool) & (partition_of >= 0))
        if not len(rows):
            return
        rows = rows[np.argsort(partition_of[rows], kind="stable")]  # by partition, in order
        starts = np.flatnonzero(np.diff(partition_of[rows], prepend=-2))
        # Kept in the order the partitions first appear in the batch, as scored: of two rows
        # of one order_id, the later kept is the one that counts (RetainedOrders.add).
        groups = sorted(np.split(rows, starts[1:]), key=lambda take: int(take[0]))
        offset, published = np.asarray(offsets, dtype=np.int64), np.asarray(published_ms,
                                                                              dtype=np.int64)
        was_expired, revision = np.asarray(expired, dtype=bool), np.asarray(revisions,
                                                                             dtype=np.int32)
        label = np.asarray(recommendations, dtype=object)
        for take in groups:
            picked = take.tolist()
            retained.add(Kept(
                partition=int(partition_of[picked[0]]),
                order_id=[orders.order_id[i] for i in picked],
                customer_id=[orders.customer_id[i] for i in picked],
                sku_code=[orders.sku_code[i] for i in picked],
                zip_code=[orders.zip_code[i] for i in picked],
                timestamp_ms=orders.timestamp_ms[take],
                offset=offset[take],
                published_ms=published[take],
                expired=was_expired[take],
                revision=revision[take],
                recommendation=label[take],
                features=features.take(take),
                scored_at_ms=scored_at,
                verified=np.ones(len(take), dtype=bool),
                alive=np.ones(len(take), dtype=bool),
                windowed_unknown=[unknown[i] for i in picked]))

    # -- corrections -------------------------------------------------------------------------

    def correct(self, late: Sequence[LateEvent]) -> list[Correction]:
        """Corrected revisions of the kept orders that ``late`` reference events (applied to
        the tables already) touch and whose features they change; nothing without
        ``retained``. Orders read back from the topic and not verified yet wait for
        :meth:`verify`."""
        if self.retained is None or not late:
            return []
        found = [(kept, rows[kept.verified[rows]]) for kept, rows in self.retained.affected(late)]
        return self._revise([(kept, rows) for kept, rows in found if len(rows)])

    def correct_windowed(self, order_ids: Sequence[str]) -> list[Correction]:
        """Corrected revisions of the kept orders among ``order_ids`` (whose feature stage
        answer changed: scoring/windowed.py) whose windowed features or unknown flags
        change."""
        if self.retained is None or not order_ids:
            return []
        rows: dict[int, tuple[Kept, list[int]]] = {}
        for order_id in dict.fromkeys(order_ids):
            found = self.retained.latest(order_id)
            if found is not None:
                kept, row = found
                if kept.alive[row] and kept.verified[row]:
                    rows.setdefault(id(kept), (kept, []))[1].append(row)
        return self._revise([(kept, np.array(sorted(found), dtype=np.int64))
                             for kept, found in rows.values()])

    def read_back(self, kept: Kept) -> None:
        """Keep a batch read back from the predictions topic (scoring/corrections.py): its
        orders count as scored, so that an event at or before them is late."""
        if self.retained is None:
            return
        self.retained.add(kept)
        if self.gate is not None:
            self.gate.scored(kept.timestamp_ms)

    def verify(self) -> list[Correction]:
        """Check the orders read back from the predictions topic against this worker's tables
        once the gate admits them; corrected revisions of those whose features differ (flagged
        reference_wait_expired where the wait ran out first)."""
        if self.retained is None:
            return []
        admitted, flagged = [], []
        for kept, rows in self.retained.unverified():
            expired = np.zeros(len(rows), dtype=bool)
            if self.gate is not None:
                waited = np.full(len(rows), self.monotonic() - kept.read_back_at)
                ready, expired = self.gate.admit(kept.timestamp_ms[rows],
                                                 kept.published_ms[rows], waited)
                rows, expired = rows[ready | expired], expired[ready | expired]
            kept.verified[rows] = True
            if len(rows):
                admitted.append((kept, rows))
                flagged.append(expired)
        return self._revise(admitted, np.concatenate(flagged) if flagged else None)

    def _revise(self, found: list[tuple[Kept, np.ndarray]],
                expired: np.ndarray | None = None) -> list[Correction]:
        """Features again for ``found`` rows; the next revision of each whose changed, in
        one predict call, and the kept rows brought up to date. ``expired``: per row, scored
        because the wait ran out (the revision says reference_wait_expired)."""
        if not found:
            return []
        order_ids = [kept.order_id[r] for kept, rows in found for r in rows.tolist()]
        skus = [kept.sku_code[r] for kept, rows in found for r in rows.tolist()]
        zips = [kept.zip_code[r] for kept, rows in found for r in rows.tolist()]
        times = np.concatenate([kept.timestamp_ms[rows] for kept, rows in found])
        old = FeatureBatch(**{name: np.concatenate([kept.features.columns[name][rows]
                                                    for kept, rows in found])
                              for name in FEATURE_NAMES})
        old_unknown = [kept.unknown(r) for kept, rows in found for r in rows.tolist()]
        windowed, unknown = self._windowed_again(found, old, old_unknown)
        fresh = compute_features(self.reference, order_ids, skus, zips, times, windowed)
        changed = changed_streams(old, fresh)
        for i, (was, now) in enumerate(zip(old_unknown, unknown, strict=True)):
            if was != now and WINDOWED_STREAM not in changed[i]:
                changed[i].append(WINDOWED_STREAM)
        where = [(kept, r) for kept, rows in found for r in rows.tolist()]
        revise = [i for i, streams in enumerate(changed) if streams]
        if not revise:
            return []
        features = fresh.take(np.array(revise))
        try:
            recommendations, proba = self.model.predict(features)
        except Exception as exc:  # the orders stand as published; the next event tries again
            self.log.error("correction_failed", orders=len(revise), error=str(exc))
            return []
        scored_at = self.clock()
        feature_records = features.records()
        out = []
        for j, (i, label, probability, feature_record) in enumerate(zip(
                revise, recommendations.tolist(), proba.tolist(), feature_records,
                strict=True)):
            kept, row = where[i]
            revision = int(kept.revision[row]) + 1
            reason = revision_reason(changed[i])
            kept.revision[row] = revision
            kept.recommendation[row] = label
            if expired is not None and expired[i]:
                kept.expired[row] = True
            if kept.windowed_unknown is not None:
                kept.windowed_unknown[row] = unknown[i]
            for name, column in features.columns.items():
                kept.features.columns[name][row] = column[j]
            for stream in set(changed[i]):
                metrics.CORRECTIONS.labels(stream).inc()
            order_id = kept.order_id[row]
            out.append(Correction(order_id.encode(), {
                "order_id": order_id,
                "customer_id": kept.customer_id[row],
                "recommendation": label,
                "probabilities": dict(zip(self.class_names, probability, strict=True)),
                "model_version": self.model.version,
                "features": feature_record,
                "order_timestamp_ms": int(kept.timestamp_ms[row]),
                "scored_at_ms": scored_at,
                "order_published_at_ms": int(kept.published_ms[row]),
                "order_partition": kept.partition,
                "order_offset": int(kept.offset[row]),
                "reference_wait_expired": bool(kept.expired[row]),
                "revision": revision,
                "revision_reason": reason,
                "sku_code": kept.sku_code[row],
                "zip_code": kept.zip_code[row],
                "windowed_unknown": unknown[i],
            }, kept.partition))
        self.log.info("predictions_corrected", orders=len(out),
                      reasons=dict(Counter(c.record["revision_reason"] for c in out)))
        return out

    def _windowed_again(self, found: list[tuple[Kept, np.ndarray]], old: FeatureBatch,
                        old_unknown: list[dict[str, str]]
                        ) -> tuple[dict[str, np.ndarray] | None, list[dict[str, str]]]:
        """The windowed features of kept rows as the join has them now. Where it has no
        answer (not come yet, or forgotten), what was published stands, except a null that
        said nothing (the feature was not joined when it was published: a model swapped in
        since reads it), which now says ``wait_expired``. An answer ``window_expired`` (the
        stage no longer knows) does not replace a value published as known."""
        if self.windowed is None:
            return ({name: old.columns[name] for name in WINDOWED_NAMES}, old_unknown)
        orders = [{"order_id": kept.order_id[r], "customer_id": kept.customer_id[r],
                   "sku_code": kept.sku_code[r], "zip_code": kept.zip_code[r]}
                  for kept, rows in found for r in rows.tolist()]
        joined = self.windowed.lookup(orders)
        values = {name: old.columns[name].copy() for name in WINDOWED_NAMES}
        unknown = []
        for i, (now, was) in enumerate(zip(joined.unknown, old_unknown, strict=True)):
            row = {name: why for name, why in now.items() if why != WAIT_EXPIRED}
            for name in self.windowed.names:
                why = now.get(name)
                if why == WAIT_EXPIRED:  # no answer now: the published one stands
                    if name in was:
                        row[name] = was[name]
                    elif np.isnan(values[name][i]):
                        row[name] = WAIT_EXPIRED
                elif why == WINDOW_EXPIRED and name not in was:
                    row.pop(name, None)  # known when published: the stage forgot it since
                else:
                    values[name][i] = joined.values[name][i]
            unknown.append(row)
        return values, unknown

    def _count_unknown_zips(self, zip_codes: list[str]) -> None:
        """Count orders to zips the reference data does not know (scored as not served), and
        warn once if they look like reference zips that lost their leading zeros."""
        known = self.reference.keys("zip_codes")
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


def _take(columns: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The ``rows`` of a batch's columns (lists, Constants, MapMatrix, a record's columns)."""
    taken: dict[str, Any] = {}
    for name, column in columns.items():
        if isinstance(column, Constant):
            taken[name] = column
        elif isinstance(column, MapMatrix):
            taken[name] = MapMatrix(column.keys, column.values[rows])
        elif isinstance(column, dict):
            taken[name] = _take(column, rows)
        else:
            taken[name] = [column[i] for i in rows]
    return taken


def _partition(item: Incoming) -> int:
    """The orders partition a record was read from; -1 for one read from no partition."""
    return item.source.partition if item.source is not None else -1


def _call_check(hook: CheckHook | HookRunner, records: list[Record], deadline: float
                ) -> list[Rejection]:
    if isinstance(hook, HookRunner):
        return hook.call("check", records, deadline) or []
    return list(hook.check(records))


def split_hooks(hooks: Sequence[object]) -> tuple[list[HookRunner], list[HookRunner]]:
    """User hooks as runners: (check hooks, observe hooks). ``hooks`` holds the runners of
    :func:`~triage.scoring.hooks.load_hooks` (TRIAGE_HOOKS) or bare hook objects, which get a
    runner without a factory (an overrunning call is then waited for, not replaced)."""
    runners = [h if isinstance(h, HookRunner) else HookRunner(h) for h in hooks]
    return ([r for r in runners if isinstance(r.hook, CheckHook)],
            [r for r in runners if isinstance(r.hook, ObserveHook)])
