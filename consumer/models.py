"""Models that change without a stop: the control topic that says which registry version is
active, and the follower that swaps a worker's model between two batches.

**The control topic** (``TRIAGE_MODELS_TOPIC``, compacted, one partition) holds the whole
state (:class:`ModelState`: active, previous, who, when) under the one key ``state``, one
record per change; compaction keeps the latest, which is all a worker or a rollback needs.
``triage models promote`` and ``rollback`` write it (:func:`publish_state`); they read the
current one with :func:`read_state`.

**A worker started with ``--registry DIR``** (instead of ``--model``) runs a
:class:`ModelFollower`: a thread that reads the control topic from the beginning and keeps
reading. For each new active version it verifies and loads the artifact from the registry in
the background, then hands it over; the scorer swaps it in between two batches, so every
batch, and every prediction (its ``model_version``), is scored by one whole model. A version
that cannot be loaded (missing, a file changed after training) is refused: the worker keeps
its current model, logs ``model_refused``, counts it in ``triage_model_refusals_total``, and
tries again every 30 s (a shared volume may still be syncing) until the state changes.
A worker that finds no state yet is not ready: it waits for the first promotion.
"""

from __future__ import annotations

import getpass
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from triage.bus.clients import make_consumer, make_producer, produce
from triage.bus.errors import InfrastructureError, TriageError
from triage.bus.settings import ConnectionSettings, TopicSettings
from triage.consumer import metrics
from triage.model import artifact
from triage.model.artifact import Model
from triage.model.registry import Registry
from triage.schemas.codec import DecodeError, codec_for

STATE_KEY = b"state"
_POLL_S = 0.1
_RETRY_S = 30.0  # a refused version is tried again this often, until the state changes


@dataclass(frozen=True)
class ModelState:
    """The models control topic's record (schemas/model_state.avsc)."""

    active: str
    previous: str | None
    action: str          # promote | rollback | shadow
    changed_by: str
    changed_at_ms: int   # UTC ms
    forced: bool = False
    shadow: str | None = None

    @classmethod
    def of(cls, record: dict[str, Any]) -> ModelState:
        return cls(record["active"], record["previous"], record["action"],
                   record["changed_by"], record["changed_at_ms"], record["forced"],
                   record["shadow"])

    def record(self) -> dict[str, Any]:
        return {"active": self.active, "previous": self.previous, "shadow": self.shadow,
                "action": self.action, "changed_by": self.changed_by,
                "changed_at_ms": self.changed_at_ms, "forced": self.forced}


def changed(active: str, previous: str | None, action: str, by: str | None = None,
            forced: bool = False, shadow: str | None = None) -> ModelState:
    """A new state, made now by ``by`` (default: this process's user name)."""
    return ModelState(active, previous, action, by or getpass.getuser(),
                      int(time.time() * 1000), forced, shadow)


@dataclass(frozen=True)
class Models:
    """What a worker scores with: the active model, and the shadow one if any."""

    active: Model
    shadow: Model | None = None


def read_state(connection: ConnectionSettings, topics: TopicSettings,
               timeout_s: float = 30.0) -> ModelState | None:
    """The latest state on the control topic, None if it has none. Reads to the high watermark
    that the fetches report (not ListOffsets: see docs/operating.md on the embedded broker). Raises
    InfrastructureError if the topic cannot be read within ``timeout_s``."""
    codec = codec_for(connection, "model_state", topics.models_topic)
    consumer = make_consumer(connection, f"triage-models-{uuid.uuid4().hex[:12]}")
    tp = TopicPartition(topics.models_topic, 0, OFFSET_BEGINNING)
    consumer.assign([tp])
    state, position = None, 0
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            for msg in consumer.consume(100, _POLL_S):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise InfrastructureError(f"{topics.models_topic}: {err.str()}")
                position = (msg.offset() or 0) + 1
                state = _decode(codec, msg.value()) or state
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0 and position >= high:
                return state
            if time.monotonic() > deadline:
                raise InfrastructureError(f"could not read {topics.models_topic} to its end "
                                          f"within {timeout_s:.0f} s (does it exist? `triage "
                                          "topics create` makes it)")
    finally:
        consumer.close()


def publish_state(connection: ConnectionSettings, topics: TopicSettings,
                  state: ModelState) -> None:
    """Write ``state`` to the control topic and wait for the broker's acknowledgement. Raises
    InfrastructureError if it was not acknowledged."""
    codec = codec_for(connection, "model_state", topics.models_topic)
    producer = make_producer(connection)
    errors: list[str] = []
    produce(producer, topics.models_topic, key=STATE_KEY, value=codec.encode(state.record()),
            on_delivery=lambda err, _: errors.append(err.str()) if err else None)
    if producer.flush(30.0) or errors:
        raise InfrastructureError(f"the model state was not written to {topics.models_topic}: "
                                  f"{errors[0] if errors else 'no acknowledgement in 30 s'}")


def _decode(codec: Any, value: bytes | None) -> ModelState | None:
    if value is None:
        return None
    try:
        return ModelState.of(codec.decode(value))
    except (DecodeError, KeyError):
        return None


class ModelFollower:
    """Follows the control topic for one worker (module docstring).

    :meth:`take` returns newly loaded :class:`Models` once (the scorer calls it between
    batches); :meth:`wait_first` blocks until the first. ``registry``: where versions are
    loaded from. Thread-safe: the follower's thread loads, the worker's loop takes."""

    def __init__(self, connection: ConnectionSettings, topics: TopicSettings,
                 registry: Registry, log: Any = None) -> None:
        self.registry = registry
        self.topic = topics.models_topic
        self.codec = codec_for(connection, "model_state", topics.models_topic)
        # assign(), never subscribe() or commit: the group id only names this reader.
        self.consumer = make_consumer(connection, f"triage-models-{uuid.uuid4().hex[:12]}")
        self.consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
        self.log = log or structlog.get_logger("models")
        self.current: Models | None = None  # the models last handed over (being scored)
        self._seen: tuple[str, str | None] | None = None  # (active, shadow) last acted on
        self._retry_at = float("inf")  # monotonic s: when to try a refused version again
        self._ready: Models | None = None
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-follower", daemon=True)

    def start(self) -> ModelFollower:
        self._thread.start()
        return self

    def wait_first(self, stop: Any = lambda: False, tick: Any = lambda: None) -> Models | None:
        """Block until the first models are loaded, calling ``tick()`` every 0.2 s (the worker
        is alive, only not ready); None if ``stop()`` became true first."""
        while not self._loaded.wait(0.2):
            tick()
            if stop():
                return None
        return self.take()

    def take(self) -> Models | None:
        """The models loaded since the last call, or None."""
        with self._lock:
            models, self._ready = self._ready, None
        return models

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.consumer.close()

    def _run(self) -> None:
        latest: ModelState | None = None
        reported: set[str] = set()  # consumer errors already logged (a missing topic repeats)
        while not self._stop.is_set():
            try:
                for msg in self.consumer.consume(100, _POLL_S):
                    err = msg.error()
                    if err is None:
                        latest = _decode(self.codec, msg.value()) or latest
                    elif err.code() != KafkaError._PARTITION_EOF and err.str() not in reported:
                        reported.add(err.str())
                        self.log.error("models_topic_error", topic=self.topic, error=err.str(),
                                       note="`triage topics create` makes the control topic")
                # Only the latest record read so far matters: a backlog of changes loads once;
                # a refused one is tried again every _RETRY_S (a volume still syncing).
                if latest is not None and ((latest.active, latest.shadow) != self._seen
                                           or time.monotonic() >= self._retry_at):
                    self._load(latest)
            except Exception as exc:  # never let the thread die silently: say so, go on
                metrics.MODEL_REFUSALS.inc()
                self.log.exception("model_follower_error", error=str(exc))
                self._stop.wait(1.0)

    def _load(self, state: ModelState) -> None:
        self._seen = (state.active, state.shadow)
        self._retry_at = float("inf")
        current = self.current
        active = self._model(state.active, current.active if current else None)
        if active is None:
            self._retry_at = time.monotonic() + _RETRY_S
            return
        shadow = None
        if state.shadow is not None and state.shadow != state.active:
            shadow = self._model(state.shadow, current.shadow if current else None)
            if shadow is None:
                self._retry_at = time.monotonic() + _RETRY_S
        models = Models(active, shadow)
        with self._lock:
            self._ready = self.current = models
        self.log.info("model_loaded", version=state.active,
                      shadow=shadow.version if shadow else None, action=state.action,
                      changed_by=state.changed_by)
        self._loaded.set()

    def _model(self, version: str, have: Model | None) -> Model | None:
        """``version`` loaded from the registry (``have`` if it is that version already); None
        and a refusal logged and counted if it cannot be loaded."""
        if have is not None and have.version == version:
            return have
        try:
            return artifact.load(self.registry.path(version))
        except TriageError as exc:
            metrics.MODEL_REFUSALS.inc()
            self.log.error("model_refused", version=version, error=str(exc),
                           keeping=self.current.active.version if self.current else None,
                           note="the promoted version could not be loaded; the worker goes on "
                           "with the models it has")
            return None


def compare(connection: ConnectionSettings, topics: TopicSettings, *, since_ms: int,
            idle_s: float = 3.0, shadow_version: str | None = None,
            active_version: str | None = None) -> dict[str, Any]:
    """Agreement of the shadow version with the active one over the orders both scored since
    ``since_ms`` (UTC ms): the shadow topic's predictions joined to the predictions topic's
    first revisions by order (partition and offset of the order, so a re-read order counts
    once; the shadow scored the features of the first revision, and is not corrected). Returns
    {"active", "shadow", "pairs", "agreement" (0..1), "classes", "confusion" (rows: active,
    columns: shadow), "active_policy_agreement", "shadow_policy_agreement" (0..1: agreement
    with the policy, model/policy.py, applied to the features both scored with)}; with
    several versions in the window, the most frequent of each, unless ``shadow_version`` and
    ``active_version`` name the pair to compare."""
    from collections import Counter

    from triage.consumer.reader import TopicReader
    from triage.model.features import FEATURE_NAMES, FeatureBatch
    from triage.model.policy import CLASSES, label

    def read(topic: str, version: str | None) -> dict[tuple[int, int], dict[str, Any]]:
        with TopicReader(connection, topic, "prediction") as reader:
            return {(p["order_partition"], p["order_offset"]): p
                    for _, p in reader.read(idle_s=idle_s)
                    if p is not None and p["scored_at_ms"] >= since_ms and p["revision"] == 1
                    and version in (None, p["model_version"])}

    shadow = read(topics.shadow_topic, shadow_version)
    active = read(topics.predictions_topic, active_version) if shadow else {}
    pairs = [(active[k], s) for k, s in shadow.items() if k in active]
    index = {c: i for i, c in enumerate(CLASSES)}
    confusion = [[0] * len(CLASSES) for _ in CLASSES]
    for a, s in pairs:
        confusion[index[a["recommendation"]]][index[s["recommendation"]]] += 1
    agreed = sum(confusion[i][i] for i in range(len(CLASSES)))
    policy: list[str] = []
    if pairs:
        features = FeatureBatch.from_values(
            {name: [s["features"][name] for _, s in pairs] for name in FEATURE_NAMES})
        policy = label(features).tolist()

    def with_policy(side: int) -> float:
        same = sum(pair[side]["recommendation"] == p for pair, p in zip(pairs, policy,
                                                                          strict=True))
        return same / len(pairs) if pairs else 0.0

    def most(records: list[dict[str, Any]]) -> str | None:
        counts = Counter(r["model_version"] for r in records)
        return counts.most_common(1)[0][0] if counts else None

    return {"active": most([a for a, _ in pairs]), "shadow": most([s for _, s in pairs]),
            "pairs": len(pairs), "agreement": agreed / len(pairs) if pairs else 0.0,
            "classes": list(CLASSES), "confusion": confusion,
            "active_policy_agreement": with_policy(0), "shadow_policy_agreement": with_policy(1)}
