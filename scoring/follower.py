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
from dataclasses import dataclass
from typing import Any

import structlog

from triage.bus.control_topic import ControlTopicFollower, publish_value, read_values
from triage.bus.errors import TriageError
from triage.bus.settings import ConnectionSettings, TopicSettings
from triage.model import artifact
from triage.model.artifact import Model
from triage.model.registry import Registry
from triage.schemas.codec import DecodeError, codec_for
from triage.scoring import metrics

STATE_KEY = b"state"
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
    backtest: str | None = None  # the passed backtest's id a promotion required

    @classmethod
    def of(cls, record: dict[str, Any]) -> ModelState:
        return cls(record["active"], record["previous"], record["action"],
                   record["changed_by"], record["changed_at_ms"], record["forced"],
                   record["shadow"], record.get("backtest"))

    def record(self) -> dict[str, Any]:
        return {"active": self.active, "previous": self.previous, "shadow": self.shadow,
                "action": self.action, "changed_by": self.changed_by,
                "changed_at_ms": self.changed_at_ms, "forced": self.forced,
                "backtest": self.backtest}


def changed(active: str, previous: str | None, action: str, by: str | None = None,
            forced: bool = False, shadow: str | None = None,
            backtest: str | None = None) -> ModelState:
    """A new state, made now by ``by`` (default: this process's user name)."""
    return ModelState(active, previous, action, by or getpass.getuser(),
                      int(time.time() * 1000), forced, shadow, backtest)


@dataclass(frozen=True)
class Models:
    """What a worker scores with: the active model, and the shadow one if any."""

    active: Model
    shadow: Model | None = None


def read_state(connection: ConnectionSettings, topics: TopicSettings,
               timeout_s: float = 30.0) -> ModelState | None:
    """The latest state on the control topic, None if it has none. Raises InfrastructureError
    if the topic cannot be read to its end within ``timeout_s`` (bus/control_topic.py)."""
    codec = codec_for(connection, "model_state", topics.models_topic)
    state = None
    for value in read_values(connection, topics.models_topic, timeout_s):
        state = _decode(codec, value) or state
    return state


def publish_state(connection: ConnectionSettings, topics: TopicSettings,
                  state: ModelState) -> None:
    """Write ``state`` to the control topic and wait for the broker's acknowledgement. Raises
    InfrastructureError if it was not acknowledged."""
    publish_value(connection, topics.models_topic, STATE_KEY,
                  encode_state(connection, topics.models_topic, state))


def encode_state(connection: ConnectionSettings, topic: str, state: ModelState) -> bytes:
    """``state`` as the control topic's record. A state that records no backtest is written
    with the contract's first version (schemas/history/model_state.1.avsc), which workers
    older than the ``backtest`` field read too: a promotion that needs no backtest leaves none
    of them behind during a rolling upgrade (docs/contracts.md)."""
    schema = "model_state" if state.backtest is not None else "history/model_state.1"
    return codec_for(connection, schema, topic).encode(state.record())


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
        self.log = log or structlog.get_logger("models")
        self.current: Models | None = None  # the models last handed over (being scored)
        self._seen: tuple[str, str | None] | None = None  # (active, shadow) last acted on
        self._retry_at = float("inf")  # monotonic s: when to try a refused version again
        self._ready: Models | None = None
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._latest: ModelState | None = None  # the latest state read
        self._reader = ControlTopicFollower(connection, self.topic, on_value=self._read,
                                            on_idle=self._act, on_error=self._failed,
                                            log=self.log, name="model-follower")

    def start(self) -> ModelFollower:
        self._reader.start()
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
        self._reader.close()

    def _read(self, value: bytes) -> None:
        self._latest = _decode(self.codec, value) or self._latest

    def _act(self) -> None:
        # Only the latest record read so far matters: a backlog of changes loads once; a
        # refused one is tried again every _RETRY_S (a volume still syncing).
        latest = self._latest
        if latest is not None and ((latest.active, latest.shadow) != self._seen
                                   or time.monotonic() >= self._retry_at):
            self._load(latest)

    def _failed(self, exc: BaseException) -> None:
        metrics.MODEL_REFUSALS.inc()

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
