"""One typed settings object, read from ``TRIAGE_*`` environment variables.

CLI flags override single fields with :meth:`Settings.replace`. Every field names its
environment variable in its metadata, so the README table and the worker processes (which
receive their settings through the environment) stay in step with this file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A TRIAGE_* variable or flag has a value that cannot be used."""


def _setting(default: Any, env: str, doc: str) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc})


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "triage")


@dataclass(frozen=True)
class Settings:
    bootstrap_servers: str = _setting(
        "", "TRIAGE_BOOTSTRAP_SERVERS",
        "Kafka bootstrap servers. Empty: use the running embedded broker (`triage broker`).")
    schema_registry_url: str = _setting(
        "", "TRIAGE_SCHEMA_REGISTRY_URL",
        "Confluent Schema Registry URL. Set: write registry framing. Empty: Avro single-object "
        "encoding. The decoder reads both.")
    orders_topic: str = _setting("orders", "TRIAGE_ORDERS_TOPIC", "Topic the orders arrive on.")
    predictions_topic: str = _setting(
        "predictions", "TRIAGE_PREDICTIONS_TOPIC", "Topic the predictions go to.")
    drift_topic: str = _setting("drift", "TRIAGE_DRIFT_TOPIC", "Topic the drift samples go to.")
    dlq_topic: str = _setting(
        "orders.dlq", "TRIAGE_DLQ_TOPIC", "Dead-letter topic for records that cannot be scored.")
    orders_partitions: int = _setting(
        6, "TRIAGE_ORDERS_PARTITIONS",
        "Partitions of the orders topic when `triage topics create` makes it; the ceiling on "
        "useful scorer workers.")
    output_partitions: int = _setting(
        6, "TRIAGE_OUTPUT_PARTITIONS",
        "Partitions of the predictions, drift and dead-letter topics when created.")
    replication_factor: int = _setting(
        1, "TRIAGE_REPLICATION_FACTOR", "Replication factor of created topics.")
    group_id: str = _setting(
        "triage-scorer", "TRIAGE_GROUP_ID", "Consumer group of the scorer workers.")
    batch_size: int = _setting(
        500, "TRIAGE_BATCH_SIZE", "Most orders one worker consumes and scores in one batch.")
    batch_timeout_ms: int = _setting(
        100, "TRIAGE_BATCH_TIMEOUT_MS",
        "Longest a worker waits to fill a batch before scoring what it has.")
    sample_rate: float = _setting(
        0.05, "TRIAGE_SAMPLE_RATE",
        "Share of orders (by order_id hash) the sampler copies to the drift topic.")
    session_timeout_ms: int = _setting(
        6000, "TRIAGE_SESSION_TIMEOUT_MS",
        "Consumer group session timeout. 6000 keeps the embedded broker's first join at 3 s.")
    state_dir: str = _setting(
        "", "TRIAGE_STATE_DIR",
        "Where `triage broker` records the embedded broker's address "
        "(default $XDG_STATE_HOME/triage, else ~/.local/state/triage).")
    log_format: str = _setting(
        "json", "TRIAGE_LOG_FORMAT",
        "`json` (one JSON object per line) or `console`. Unset: `console` when stderr is a "
        "terminal, else `json`.")
    log_level: str = _setting("info", "TRIAGE_LOG_LEVEL", "debug, info, warning or error.")

    def __post_init__(self) -> None:
        if not self.state_dir:
            object.__setattr__(self, "state_dir", _default_state_dir())
        for name in ("orders_partitions", "output_partitions", "replication_factor",
                     "batch_size", "batch_timeout_ms", "session_timeout_ms"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.sample_rate <= 1.0:
            raise SettingsError(f"sample_rate must be within [0, 1], got {self.sample_rate}")
        if self.log_format not in ("json", "console"):
            raise SettingsError(f"log_format must be json or console, got {self.log_format!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``TRIAGE_*`` variables; unset ones keep their defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f, raw)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with the given fields changed; ``None`` values (unset flags) are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_env(self) -> dict[str, str]:
        """The ``TRIAGE_*`` variables that reproduce these settings in a child process."""
        return {f.metadata["env"]: str(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float}.get(f.type, str)
    try:
        return kind(raw)
    except ValueError:
        raise SettingsError(
            f"{f.metadata['env']}={raw!r} is not a valid {kind.__name__}") from None


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) rows, for the README and `triage settings`."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = "" if f.name == "state_dir" else str(f.default)
        rows.append((f.metadata["env"], default, f.metadata["doc"]))
    return rows
