"""Settings, read from ``TRIAGE_*`` environment variables, in sections: the machinery, and
the bus's own sections.

Each component declares its sections beside itself: the bus its :class:`ConnectionSettings`
(Kafka and Schema Registry clients) and :class:`TopicSettings` here; the scoring core its
core, validation and reference feed sections (scoring/settings.py), the Kafka worker its
scorer and drift monitor sections (consumer/settings.py), the gateway its HTTP section
(gateway/settings.py), the model side the input files' and MLflow's (model/settings.py). A
process reads an *aggregate* of the sections it needs, a :class:`SettingsBase` subclass: the
worker its WorkerSettings, ``triage serve`` its GatewaySettings, ``triage replay`` its
ProducerSettings; the command line's Settings (triage/settings.py) holds them all, and is each
of them (it inherits from every aggregate), so a component takes it as its own.

The environment stays flat: every field names its own ``TRIAGE_*`` variable in its metadata
(so docs/configuration.md and the worker processes, which receive their settings through the
environment, stay in step with the declarations), and field names are unique across sections,
so :meth:`SettingsBase.of` and :meth:`SettingsBase.replace` take them flat, as the CLI's flags
do.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from triage.bus.errors import ConfigurationError


class SettingsError(ConfigurationError):
    """A TRIAGE_* variable or flag has a value that cannot be used."""


#: The variable of a reference stream's topic (TopicSettings.stream_topics).
STREAM_TOPIC_PATTERN = "TRIAGE_<STREAM>_TOPIC"
_STREAM_TOPIC = re.compile(r"TRIAGE_([A-Z0-9_]+)_TOPIC")


def setting(default: Any, env: str, doc: str) -> Any:
    """A field of a section: its default, its ``TRIAGE_*`` variable and what it means (the
    settings table's row)."""
    return field(default=default, metadata={"env": env, "doc": doc})


def section(cls: type) -> Any:
    """A field of an aggregate holding the section ``cls`` (a frozen dataclass of settings)."""
    return field(default_factory=cls, metadata={"section": True})


def secret(env: str, doc: str) -> Any:
    """A secret: also read from the file named by ``<env>_FILE``; never in repr or logs."""
    return field(default="", repr=False,
                 metadata={"env": env, "doc": doc + f" Or put it in a file named by {env}_FILE.",
                           "secret": True})


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "triage")


def at_least_one(owner: object, *names: str) -> None:
    """Raise SettingsError unless each of ``names`` of ``owner`` is at least 1."""
    for name in names:
        if getattr(owner, name) < 1:
            raise SettingsError(f"{name} must be at least 1, got {getattr(owner, name)}")


def check_port(variable: str, port: int, *, off: bool) -> None:
    """Raise SettingsError unless ``port`` is a TCP port (1-65535), or 0 when ``off`` allows
    turning the listener off."""
    if not (off and port == 0) and not 1 <= port <= 65_535:
        allowed = "1-65535" + (" or 0 (off)" if off else "")
        raise SettingsError(f"{variable} must be a TCP port, {allowed}, got {port}")


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class ConnectionSettings:
    """How every client reaches Kafka and the Schema Registry, and how it behaves in a group."""

    bootstrap_servers: str = setting(
        "", "TRIAGE_BOOTSTRAP_SERVERS",
        "Kafka bootstrap servers. Empty: use the running embedded broker (`triage broker`).")
    schema_registry_url: str = setting(
        "", "TRIAGE_SCHEMA_REGISTRY_URL",
        "Confluent Schema Registry URL. Set: write registry framing. Empty: Avro single-object "
        "encoding. The decoder reads both.")
    security_protocol: str = setting(
        "PLAINTEXT", "TRIAGE_SECURITY_PROTOCOL", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    sasl_mechanism: str = setting(
        "", "TRIAGE_SASL_MECHANISM", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with SASL_*).")
    sasl_username: str = setting("", "TRIAGE_SASL_USERNAME", "SASL user name.")
    sasl_password: str = secret("TRIAGE_SASL_PASSWORD", "SASL password.")
    ssl_ca_location: str = setting(
        "", "TRIAGE_SSL_CA_LOCATION", "CA certificate file (PEM) to verify the brokers with.")
    ssl_certificate_location: str = setting(
        "", "TRIAGE_SSL_CERTIFICATE_LOCATION", "Client certificate (PEM), for mutual TLS.")
    ssl_key_location: str = setting(
        "", "TRIAGE_SSL_KEY_LOCATION", "Client private key (PEM), for mutual TLS.")
    ssl_key_password: str = secret("TRIAGE_SSL_KEY_PASSWORD", "Password of the client key.")
    schema_registry_basic_auth: str = secret(
        "TRIAGE_SCHEMA_REGISTRY_BASIC_AUTH", "`user:password` for the Schema Registry.")
    schema_registry_ssl_ca_location: str = setting(
        "", "TRIAGE_SCHEMA_REGISTRY_SSL_CA_LOCATION",
        "CA certificate file (PEM) or directory to verify an `https://` Schema Registry with. "
        "Empty: `SSL_CERT_FILE` or `SSL_CERT_DIR` if set, else certifi's CA bundle (not the "
        "system's store).")
    schema_registry_ssl_certificate_location: str = setting(
        "", "TRIAGE_SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION",
        "Client certificate (PEM), for mutual TLS with the Schema Registry.")
    schema_registry_ssl_key_location: str = setting(
        "", "TRIAGE_SCHEMA_REGISTRY_SSL_KEY_LOCATION",
        "Client private key (PEM), for mutual TLS with the Schema Registry.")
    schema_registry_ssl_key_password: str = secret(
        "TRIAGE_SCHEMA_REGISTRY_SSL_KEY_PASSWORD",
        "Password of the Schema Registry client key.")
    session_timeout_ms: int = setting(
        6000, "TRIAGE_SESSION_TIMEOUT_MS",
        "Consumer group session timeout. 6000 keeps the embedded broker's first join at 3 s.")
    max_poll_interval_ms: int = setting(
        300_000, "TRIAGE_MAX_POLL_INTERVAL_MS",
        "Consumer `max.poll.interval.ms`: a worker that does not ask for records for this long "
        "is evicted from the group. At least TRIAGE_SESSION_TIMEOUT_MS.")
    metadata_refresh_ms: int = setting(
        10_000, "TRIAGE_METADATA_REFRESH_MS",
        "Clients' `topic.metadata.refresh.interval.ms`: a topic created again or a partition "
        "added is picked up within this time (librdkafka's default is 5 minutes).")
    assignment_strategy: str = setting(
        "cooperative-sticky", "TRIAGE_ASSIGNMENT_STRATEGY",
        "Partition assignment: `cooperative-sticky` (incremental rebalances) or an eager one "
        "(`range`, `roundrobin`) for brokers that cannot do cooperative rebalancing.")
    group_protocol: str = setting(
        "classic", "TRIAGE_GROUP_PROTOCOL",
        "Consumer group protocol: `classic` (the client's assignor, TRIAGE_SESSION_TIMEOUT_MS "
        "and TRIAGE_ASSIGNMENT_STRATEGY apply) or `consumer` (KIP-848, Apache Kafka 4.x: the "
        "broker assigns partitions and its group.consumer.* settings govern sessions and "
        "heartbeats; the two settings above are then left out). The embedded broker speaks "
        "only `classic`.")
    state_dir: str = setting(
        "", "TRIAGE_STATE_DIR",
        "Where `triage broker` records the embedded broker's address "
        "(default `$XDG_STATE_HOME/triage`, else `~/.local/state/triage`).")

    def __post_init__(self) -> None:
        if not self.state_dir:
            object.__setattr__(self, "state_dir", _default_state_dir())
        at_least_one(self, "session_timeout_ms", "metadata_refresh_ms")
        if self.group_protocol not in ("classic", "consumer"):
            raise SettingsError(f"TRIAGE_GROUP_PROTOCOL must be classic or consumer, got "
                                f"{self.group_protocol!r}")
        if self.max_poll_interval_ms < self.session_timeout_ms:
            raise SettingsError(
                f"TRIAGE_MAX_POLL_INTERVAL_MS ({self.max_poll_interval_ms}) must be at least "
                f"TRIAGE_SESSION_TIMEOUT_MS ({self.session_timeout_ms})")
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise SettingsError(f"TRIAGE_SECURITY_PROTOCOL must be one of "
                                f"{', '.join(SECURITY_PROTOCOLS)}, got {self.security_protocol!r}")
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise SettingsError(f"TRIAGE_SASL_MECHANISM must be one of "
                                    f"{', '.join(SASL_MECHANISMS)} with {self.security_protocol}")
            if not self.sasl_username or not self.sasl_password:
                raise SettingsError(f"{self.security_protocol} needs TRIAGE_SASL_USERNAME and "
                                    "TRIAGE_SASL_PASSWORD (or TRIAGE_SASL_PASSWORD_FILE)")
        if (self.schema_registry_ssl_key_location or self.schema_registry_ssl_key_password) \
                and not self.schema_registry_ssl_certificate_location:
            raise SettingsError("TRIAGE_SCHEMA_REGISTRY_SSL_KEY_LOCATION and _KEY_PASSWORD need "
                                "TRIAGE_SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION")
        for name in ("schema_registry_ssl_ca_location",
                     "schema_registry_ssl_certificate_location",
                     "schema_registry_ssl_key_location"):
            path = getattr(self, name)
            if path and not Path(path).exists():
                raise SettingsError(f"TRIAGE_{name.upper()}={path}: no such file")


@dataclass(frozen=True)
class TopicSettings:
    """The service's topics: names, and partitions when `triage topics create` makes them."""

    orders_topic: str = setting("orders", "TRIAGE_ORDERS_TOPIC", "Topic the orders arrive on.")
    predictions_topic: str = setting(
        "predictions", "TRIAGE_PREDICTIONS_TOPIC", "Topic the predictions go to.")
    drift_topic: str = setting("drift", "TRIAGE_DRIFT_TOPIC", "Topic the drift samples go to.")
    dlq_topic: str = setting(
        "orders.dlq", "TRIAGE_DLQ_TOPIC", "Dead-letter topic for records that cannot be scored.")
    drift_reports_topic: str = setting(
        "drift.reports", "TRIAGE_DRIFT_REPORTS_TOPIC",
        "Topic the drift monitor writes one report per window to.")
    orders_partitions: int = setting(
        6, "TRIAGE_ORDERS_PARTITIONS",
        "Partitions of the orders topic when `triage topics create` makes it; the ceiling on "
        "useful scorer workers.")
    output_partitions: int = setting(
        6, "TRIAGE_OUTPUT_PARTITIONS",
        "Partitions of the predictions, drift and dead-letter topics when created.")
    replication_factor: int = setting(
        1, "TRIAGE_REPLICATION_FACTOR", "Replication factor of created topics.")
    reference_dlq_topic: str = setting(
        "reference.dlq", "TRIAGE_REFERENCE_DLQ_TOPIC",
        "Dead-letter topic for reference records that do not decode or validate.")
    shadow_topic: str = setting(
        "predictions.shadow", "TRIAGE_SHADOW_TOPIC",
        "Predictions of the shadow model version (`triage models shadow`), never on the "
        "predictions topic.")
    models_topic: str = setting(
        "models.control", "TRIAGE_MODELS_TOPIC",
        "Compacted control topic: which registry version is active (`triage models promote`), "
        "followed by workers started with --registry.")
    reference_partitions: int = setting(
        6, "TRIAGE_REFERENCE_PARTITIONS",
        "Partitions of the global reference streams' topics when created (inventory, "
        "zip_codes; a co-partitioned one, payments, gets the orders topic's count).")
    windows_topic_prefix: str = setting(
        "windows", "TRIAGE_WINDOWS_TOPIC_PREFIX",
        "Names the window stores of the feature stage (`triage windows`): the store of an "
        "entity is `<prefix>.<entity>` (say `windows.customer_id`), its topics "
        "`<store>-repartition` (orders keyed by the entity) and `<store>-changelog` (the "
        "store's state, compacted).")
    windowed_features_topic: str = setting(
        "windowed_features", "TRIAGE_WINDOWED_FEATURES_TOPIC",
        "Topic the feature stage publishes each order's windowed feature values to, keyed by "
        "order_id (schemas/windowed_features.avsc).")
    # The reference streams' topics, (stream, topic) pairs for those not named as the stream:
    # TRIAGE_<STREAM>_TOPIC, one per stream declared in model/streams.py (listed there and in
    # docs/configuration.md). Set with Settings.of(payments_topic=...) or the variable.
    stream_topics: tuple[tuple[str, str], ...] = field(
        default=(), metadata={"env": STREAM_TOPIC_PATTERN, "doc": "", "streams": True})

    def __post_init__(self) -> None:
        at_least_one(self, "orders_partitions", "output_partitions", "replication_factor",
                      "reference_partitions")

    def topic_of(self, stream: str) -> str:
        """The topic of the reference stream ``stream`` (model/streams.py): its
        ``TRIAGE_<STREAM>_TOPIC``, by default the stream's name."""
        return dict(self.stream_topics).get(stream, stream)


@dataclass(frozen=True)
class SettingsBase:
    """An aggregate of sections (module docstring): the connection, the topics and the logs,
    which every process reads, and a subclass's sections (fields made with :func:`section`)
    and top-level settings. Built from the environment (:meth:`from_env`) or flat names
    (:meth:`of`); checked when made (:meth:`check`, which subclasses extend)."""

    connection: ConnectionSettings = section(ConnectionSettings)
    topics: TopicSettings = section(TopicSettings)
    log_format: str = setting(
        "json", "TRIAGE_LOG_FORMAT",
        "`json` (one JSON object per line) or `console`. Unset: `console` when stderr is a "
        "terminal, else `json`.")
    log_level: str = setting("info", "TRIAGE_LOG_LEVEL", "debug, info, warning or error.")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise SettingsError for settings that contradict each other (each section checks
        its own fields); a subclass calls ``super().check()`` first."""
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"log_level must be debug, info, warning or error, got "
                                f"{self.log_level!r}")
        if self.log_format not in ("json", "console"):
            raise SettingsError(f"log_format must be json or console, got {self.log_format!r}")

    @classmethod
    def of(cls, **values: Any) -> Self:
        """Settings from flat field names (``orders_topic=...``); the rest keep defaults."""
        return cls().replace(**values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Build settings from ``TRIAGE_*`` variables; unset ones keep their defaults. Raises
        SettingsError for a value that cannot be used."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        fixed = {f.metadata["env"] for f, _ in cls.settings_fields()}
        for variable, value in environ.items():  # TRIAGE_<STREAM>_TOPIC: a reference stream's
            match = _STREAM_TOPIC.fullmatch(variable)
            if match and variable not in fixed and value:
                values[f"{match[1].lower()}_topic"] = value
        for f, _ in cls.settings_fields():
            if f.metadata.get("streams"):
                continue
            raw = environ.get(f.metadata["env"])
            if not raw and f.metadata.get("secret") and environ.get(f.metadata["env"] + "_FILE"):
                raw = _read_secret_file(f.metadata["env"] + "_FILE",
                                        environ[f.metadata["env"] + "_FILE"])
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f, raw)
        return cls.of(**values)

    def replace(self, **changes: Any) -> Self:
        """A copy with the given fields (flat names, any section) changed; ``None`` values
        (unset flags) are ignored; ``<stream>_topic`` names a reference stream's topic
        (model/streams.py; the scorer refuses one no stream is declared for). Raises
        SettingsError for a name no section has."""
        changes = {k: v for k, v in changes.items() if v is not None}
        owner = {f.name: name for f, name in self.settings_fields()}
        streams = {k: v for k, v in changes.items()
                   if k not in owner and k.endswith("_topic") and k != "_topic"}
        if streams:
            changes = {k: v for k, v in changes.items() if k not in streams}
            merged = dict(self.topics.stream_topics) | {k.removesuffix("_topic"): str(v)
                                                        for k, v in streams.items()}
            changes["stream_topics"] = tuple(sorted(merged.items()))
        unknown = set(changes) - set(owner)
        if unknown:
            raise SettingsError(f"no such setting: {', '.join(sorted(unknown))}")
        by_section: dict[str | None, dict[str, Any]] = {}
        for name, value in changes.items():
            by_section.setdefault(owner[name], {})[name] = value
        top = by_section.pop(None, {})
        for owned_by, section_changes in by_section.items():
            if owned_by is not None:
                top[owned_by] = dataclasses.replace(getattr(self, owned_by), **section_changes)
        return dataclasses.replace(self, **top)

    def to_env(self) -> dict[str, str]:
        """The ``TRIAGE_*`` variables that reproduce these settings in a child process."""
        env = {f.metadata["env"]: str(getattr(getattr(self, name) if name else self, f.name))
               for f, name in self.settings_fields() if not f.metadata.get("streams")}
        for stream, topic in self.topics.stream_topics:
            env[f"TRIAGE_{stream.upper()}_TOPIC"] = topic
        return env

    @classmethod
    def settings_fields(cls) -> Iterator[tuple[dataclasses.Field[Any], str | None]]:
        """Every setting's field, with the name of its section (None: the top level), the
        sections first, in declaration order."""
        top = []
        for f in dataclasses.fields(cls):
            if f.metadata.get("section"):
                factory: Any = f.default_factory
                for inner in dataclasses.fields(factory):
                    yield inner, f.name
            else:
                top.append(f)
        for f in top:
            yield f, None

    @classmethod
    def settings_table(cls) -> list[tuple[str, str, str]]:
        """(variable, default, description) rows, for docs/configuration.md and `triage
        settings`; the reference streams' topics are not among them (model/streams.py lists
        those)."""
        return [(f.metadata["env"], "" if f.name == "state_dir" else str(f.default),
                 f.metadata["doc"]) for f, _ in cls.settings_fields()
                if not f.metadata.get("streams")]


def _read_secret_file(variable: str, path: str) -> str:
    try:
        return Path(path).read_text().rstrip("\n")
    except OSError as exc:
        raise SettingsError(f"{variable}={path!r} cannot be read: {exc.strerror}") from None


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float,
                                                    "bool": bool}.get(str(f.type), str)
    if kind is bool:
        if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise SettingsError(f"{f.metadata['env']}={raw!r} is not true or false")
        return raw.lower() in ("1", "true", "yes")
    try:
        return kind(raw)
    except ValueError:
        raise SettingsError(
            f"{f.metadata['env']}={raw!r} is not a valid {kind.__name__}") from None
