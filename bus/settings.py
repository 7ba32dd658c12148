"""Settings, read from ``TRIAGE_*`` environment variables, in sections.

Each component is given only the section it needs: Kafka and Schema Registry clients the
:class:`ConnectionSettings`, topic admin and readers the :class:`TopicSettings`, the scorer its
:class:`ScorerSettings`, validation its :class:`ValidationSettings`, the drift monitor its
:class:`DriftSettings`, the live reference join its :class:`ReferenceSettings`.
:class:`Settings` holds the six and what every process shares (logs, the CSVs' encoding); the
commands and processes that wire components together take it whole.

The environment stays flat: every field names its own ``TRIAGE_*`` variable in its metadata
(so the README table and the worker processes, which receive their settings through the
environment, stay in step with this file), and field names are unique across sections, so
:meth:`Settings.of` and :meth:`Settings.replace` take them flat, as the CLI's flags do.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from triage.bus.errors import ConfigurationError


class SettingsError(ConfigurationError):
    """A TRIAGE_* variable or flag has a value that cannot be used."""


#: The variable of a reference stream's topic (TopicSettings.stream_topics).
STREAM_TOPIC_PATTERN = "TRIAGE_<STREAM>_TOPIC"
_STREAM_TOPIC = re.compile(r"TRIAGE_([A-Z0-9_]+)_TOPIC")


def _setting(default: Any, env: str, doc: str) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc})


def _secret(env: str, doc: str) -> Any:
    """A secret: also read from the file named by ``<env>_FILE``; never in repr or logs."""
    return field(default="", repr=False,
                 metadata={"env": env, "doc": doc + f" Or put it in a file named by {env}_FILE.",
                           "secret": True})


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "triage")


def _at_least_one(section: object, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise SettingsError(f"{name} must be at least 1, got {getattr(section, name)}")


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class ConnectionSettings:
    """How every client reaches Kafka and the Schema Registry, and how it behaves in a group."""

    bootstrap_servers: str = _setting(
        "", "TRIAGE_BOOTSTRAP_SERVERS",
        "Kafka bootstrap servers. Empty: use the running embedded broker (`triage broker`).")
    schema_registry_url: str = _setting(
        "", "TRIAGE_SCHEMA_REGISTRY_URL",
        "Confluent Schema Registry URL. Set: write registry framing. Empty: Avro single-object "
        "encoding. The decoder reads both.")
    security_protocol: str = _setting(
        "PLAINTEXT", "TRIAGE_SECURITY_PROTOCOL", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    sasl_mechanism: str = _setting(
        "", "TRIAGE_SASL_MECHANISM", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with SASL_*).")
    sasl_username: str = _setting("", "TRIAGE_SASL_USERNAME", "SASL user name.")
    sasl_password: str = _secret("TRIAGE_SASL_PASSWORD", "SASL password.")
    ssl_ca_location: str = _setting(
        "", "TRIAGE_SSL_CA_LOCATION", "CA certificate file (PEM) to verify the brokers with.")
    ssl_certificate_location: str = _setting(
        "", "TRIAGE_SSL_CERTIFICATE_LOCATION", "Client certificate (PEM), for mutual TLS.")
    ssl_key_location: str = _setting(
        "", "TRIAGE_SSL_KEY_LOCATION", "Client private key (PEM), for mutual TLS.")
    ssl_key_password: str = _secret("TRIAGE_SSL_KEY_PASSWORD", "Password of the client key.")
    schema_registry_basic_auth: str = _secret(
        "TRIAGE_SCHEMA_REGISTRY_BASIC_AUTH", "`user:password` for the Schema Registry.")
    schema_registry_ssl_ca_location: str = _setting(
        "", "TRIAGE_SCHEMA_REGISTRY_SSL_CA_LOCATION",
        "CA certificate file (PEM) or directory to verify an `https://` Schema Registry with. "
        "Empty: `SSL_CERT_FILE` or `SSL_CERT_DIR` if set, else certifi's CA bundle (not the "
        "system's store).")
    schema_registry_ssl_certificate_location: str = _setting(
        "", "TRIAGE_SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION",
        "Client certificate (PEM), for mutual TLS with the Schema Registry.")
    schema_registry_ssl_key_location: str = _setting(
        "", "TRIAGE_SCHEMA_REGISTRY_SSL_KEY_LOCATION",
        "Client private key (PEM), for mutual TLS with the Schema Registry.")
    schema_registry_ssl_key_password: str = _secret(
        "TRIAGE_SCHEMA_REGISTRY_SSL_KEY_PASSWORD",
        "Password of the Schema Registry client key.")
    session_timeout_ms: int = _setting(
        6000, "TRIAGE_SESSION_TIMEOUT_MS",
        "Consumer group session timeout. 6000 keeps the embedded broker's first join at 3 s.")
    max_poll_interval_ms: int = _setting(
        300_000, "TRIAGE_MAX_POLL_INTERVAL_MS",
        "Consumer `max.poll.interval.ms`: a worker that does not ask for records for this long "
        "is evicted from the group. At least TRIAGE_SESSION_TIMEOUT_MS.")
    metadata_refresh_ms: int = _setting(
        10_000, "TRIAGE_METADATA_REFRESH_MS",
        "Clients' `topic.metadata.refresh.interval.ms`: a topic created again or a partition "
        "added is picked up within this time (librdkafka's default is 5 minutes).")
    assignment_strategy: str = _setting(
        "cooperative-sticky", "TRIAGE_ASSIGNMENT_STRATEGY",
        "Partition assignment: `cooperative-sticky` (incremental rebalances) or an eager one "
        "(`range`, `roundrobin`) for brokers that cannot do cooperative rebalancing.")
    group_protocol: str = _setting(
        "classic", "TRIAGE_GROUP_PROTOCOL",
        "Consumer group protocol: `classic` (the client's assignor, TRIAGE_SESSION_TIMEOUT_MS "
        "and TRIAGE_ASSIGNMENT_STRATEGY apply) or `consumer` (KIP-848, Apache Kafka 4.x: the "
        "broker assigns partitions and its group.consumer.* settings govern sessions and "
        "heartbeats; the two settings above are then left out). The embedded broker speaks "
        "only `classic`.")
    state_dir: str = _setting(
        "", "TRIAGE_STATE_DIR",
        "Where `triage broker` records the embedded broker's address "
        "(default `$XDG_STATE_HOME/triage`, else `~/.local/state/triage`).")

    def __post_init__(self) -> None:
        if not self.state_dir:
            object.__setattr__(self, "state_dir", _default_state_dir())
        _at_least_one(self, "session_timeout_ms", "metadata_refresh_ms")
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

    orders_topic: str = _setting("orders", "TRIAGE_ORDERS_TOPIC", "Topic the orders arrive on.")
    predictions_topic: str = _setting(
        "predictions", "TRIAGE_PREDICTIONS_TOPIC", "Topic the predictions go to.")
    drift_topic: str = _setting("drift", "TRIAGE_DRIFT_TOPIC", "Topic the drift samples go to.")
    dlq_topic: str = _setting(
        "orders.dlq", "TRIAGE_DLQ_TOPIC", "Dead-letter topic for records that cannot be scored.")
    drift_reports_topic: str = _setting(
        "drift.reports", "TRIAGE_DRIFT_REPORTS_TOPIC",
        "Topic the drift monitor writes one report per window to.")
    orders_partitions: int = _setting(
        6, "TRIAGE_ORDERS_PARTITIONS",
        "Partitions of the orders topic when `triage topics create` makes it; the ceiling on "
        "useful scorer workers.")
    output_partitions: int = _setting(
        6, "TRIAGE_OUTPUT_PARTITIONS",
        "Partitions of the predictions, drift and dead-letter topics when created.")
    replication_factor: int = _setting(
        1, "TRIAGE_REPLICATION_FACTOR", "Replication factor of created topics.")
    reference_dlq_topic: str = _setting(
        "reference.dlq", "TRIAGE_REFERENCE_DLQ_TOPIC",
        "Dead-letter topic for reference records that do not decode or validate.")
    shadow_topic: str = _setting(
        "predictions.shadow", "TRIAGE_SHADOW_TOPIC",
        "Predictions of the shadow model version (`triage models shadow`), never on the "
        "predictions topic.")
    models_topic: str = _setting(
        "models.control", "TRIAGE_MODELS_TOPIC",
        "Compacted control topic: which registry version is active (`triage models promote`), "
        "followed by workers started with --registry.")
    reference_partitions: int = _setting(
        6, "TRIAGE_REFERENCE_PARTITIONS",
        "Partitions of the global reference streams' topics when created (inventory, "
        "zip_codes; a co-partitioned one, payments, gets the orders topic's count).")
    # The reference streams' topics, (stream, topic) pairs for those not named as the stream:
    # TRIAGE_<STREAM>_TOPIC, one per stream declared in model/streams.py (listed there and in
    # docs/configuration.md). Set with Settings.of(payments_topic=...) or the variable.
    stream_topics: tuple[tuple[str, str], ...] = field(
        default=(), metadata={"env": STREAM_TOPIC_PATTERN, "doc": "", "streams": True})

    def __post_init__(self) -> None:
        _at_least_one(self, "orders_partitions", "output_partitions", "replication_factor",
                      "reference_partitions")

    def topic_of(self, stream: str) -> str:
        """The topic of the reference stream ``stream`` (model/streams.py): its
        ``TRIAGE_<STREAM>_TOPIC``, by default the stream's name."""
        return dict(self.stream_topics).get(stream, stream)


@dataclass(frozen=True)
class ScorerSettings:
    """The scorer workers: their group, batching, deadline, sampling, hooks and metrics."""

    group_id: str = _setting(
        "triage-scorer", "TRIAGE_GROUP_ID", "Consumer group of the scorer workers.")
    batch_size: int = _setting(
        500, "TRIAGE_BATCH_SIZE", "Most orders one worker consumes and scores in one batch.")
    batch_timeout_ms: int = _setting(
        100, "TRIAGE_BATCH_TIMEOUT_MS",
        "Longest an idle worker waits for the next order; a batch is then what has been "
        "fetched, up to TRIAGE_BATCH_SIZE.")
    sample_rate: float = _setting(
        0.05, "TRIAGE_SAMPLE_RATE",
        "Share of orders (by order_id hash) the sampler copies to the drift topic.")
    processing_deadline_ms: int = _setting(
        30_000, "TRIAGE_PROCESSING_DEADLINE_MS",
        "Longest the check and observe hooks may take on one batch; orders a hook has not "
        "finished by then are dead-lettered as `timeout`. At most half of "
        "TRIAGE_MAX_POLL_INTERVAL_MS.")
    max_message_bytes: int = _setting(
        16384, "TRIAGE_MAX_MESSAGE_BYTES",
        "Largest order record accepted; larger ones are dead-lettered as `oversized`.")
    hooks: str = _setting(
        "", "TRIAGE_HOOKS",
        "Extra per-batch hooks, comma-separated `module:factory` (see scoring/hooks.py).")
    metrics_port: int = _setting(
        0, "TRIAGE_METRICS_PORT",
        "Serve /metrics, /healthz and /readyz from each worker on this port + worker number; "
        "0: off.")
    delivery_timeout_ms: int = _setting(
        60_000, "TRIAGE_DELIVERY_TIMEOUT_MS",
        "Longest a batch waits for the broker to acknowledge what it produced (and, with "
        "--exactly-once, for each attempt to commit its transaction); then the worker exits 1 "
        "and the batch is read again after its restart.")
    health_stall_ms: int = _setting(
        120_000, "TRIAGE_HEALTH_STALL_MS",
        "/healthz fails once a worker's loop has not completed a turn (a batch, an idle poll, a "
        "step of its restore) for this long. With a metrics port, more than "
        "TRIAGE_PROCESSING_DEADLINE_MS + TRIAGE_DELIVERY_TIMEOUT_MS, so a slow batch is not "
        "taken for a stuck loop (with --exactly-once, retried commits can take longer).")
    exactly_once: bool = _setting(
        False, "TRIAGE_EXACTLY_ONCE",
        "Transactional consume-transform-produce (`--exactly-once`); needs Apache Kafka.")
    instance_id: str = _setting(
        "", "TRIAGE_INSTANCE_ID",
        "Static membership (`--instance-id`): the worker's group.instance.id, e.g. the pod "
        "name; worker N of `triage consume` adds `-N`. A worker restarted with the same id "
        "within TRIAGE_SESSION_TIMEOUT_MS gets its partitions back without a rebalance, and "
        "with --exactly-once takes over its transactional id, so a killed worker's open "
        "transaction is aborted at once. Unique per live worker; empty: dynamic membership.")
    transaction_timeout_ms: int = _setting(
        10_000, "TRIAGE_TRANSACTION_TIMEOUT_MS",
        "With --exactly-once, the producer's transaction.timeout.ms: a killed worker's open "
        "transaction holds read_committed readers back this long, plus up to the broker's "
        "transaction.abort.timed.out.transaction.cleanup.interval.ms (without "
        "TRIAGE_INSTANCE_ID; with it the restarted worker aborts it at once). Longer than a "
        "batch's produce-and-commit.")

    def __post_init__(self) -> None:
        _at_least_one(self, "batch_size", "batch_timeout_ms", "processing_deadline_ms",
                      "delivery_timeout_ms", "health_stall_ms", "transaction_timeout_ms")
        if self.instance_id and (not self.instance_id.isprintable()
                                 or self.instance_id != self.instance_id.strip()):
            raise SettingsError(f"TRIAGE_INSTANCE_ID={self.instance_id!r} must be printable "
                                "without surrounding white space")
        if not 0.0 <= self.sample_rate <= 1.0:
            raise SettingsError(f"sample_rate must be within [0, 1], got {self.sample_rate}")


@dataclass(frozen=True)
class ValidationSettings:
    """What the built-in validation hook accepts."""

    max_field_length: int = _setting(
        128, "TRIAGE_MAX_FIELD_LENGTH",
        "Longest order_id, customer_id, sku_code or zip_code accepted.")
    earliest_order_time: str = _setting(
        "2000-01-01 00:00:00", "TRIAGE_EARLIEST_ORDER_TIME",
        "Orders timestamped before this (UTC) are dead-lettered as `invalid_timestamp`.")
    max_future_seconds: int = _setting(
        86400, "TRIAGE_MAX_FUTURE_SECONDS",
        "Orders timestamped more than this far ahead of the worker's clock are dead-lettered.")

    def __post_init__(self) -> None:
        self.earliest_order_ms  # noqa: B018 -- parse now, so a bad value fails at start-up

    @property
    def earliest_order_ms(self) -> int:
        """TRIAGE_EARLIEST_ORDER_TIME as UTC epoch milliseconds."""
        try:
            moment = datetime.fromisoformat(self.earliest_order_time)
        except ValueError:
            raise SettingsError(f"TRIAGE_EARLIEST_ORDER_TIME={self.earliest_order_time!r} is "
                                "not YYYY-MM-DD HH:MM:SS") from None
        return int(moment.replace(tzinfo=moment.tzinfo or UTC).timestamp() * 1000)


@dataclass(frozen=True)
class DriftSettings:
    """The drift monitor: its group, windows, test level and metrics."""

    drift_group_id: str = _setting(
        "triage-drift-monitor", "TRIAGE_DRIFT_GROUP_ID", "Consumer group of the drift monitor.")
    drift_window_samples: int = _setting(
        1000, "TRIAGE_DRIFT_WINDOW_SAMPLES",
        "A drift window closes after this many samples; 0: by time only.")
    drift_window_minutes: float = _setting(
        0.0, "TRIAGE_DRIFT_WINDOW_MINUTES",
        "A drift window also closes after this many minutes; 0: by sample count only.")
    drift_min_samples: int = _setting(
        500, "TRIAGE_DRIFT_MIN_SAMPLES",
        "A window with fewer samples reports `insufficient_data` instead of testing.")
    drift_alpha: float = _setting(
        0.01, "TRIAGE_DRIFT_ALPHA",
        "Chance that a window without drift raises any alarm (Holm-corrected over the checks).")
    drift_metrics_port: int = _setting(
        0, "TRIAGE_DRIFT_METRICS_PORT",
        "Serve the drift monitor's Prometheus /metrics on this port; 0: off.")

    def __post_init__(self) -> None:
        if self.drift_window_samples < 0 or self.drift_window_minutes < 0 \
                or not (self.drift_window_samples or self.drift_window_minutes):
            raise SettingsError("drift windows need TRIAGE_DRIFT_WINDOW_SAMPLES or "
                                "TRIAGE_DRIFT_WINDOW_MINUTES above 0 (and neither below 0)")
        if self.drift_min_samples < 1:
            raise SettingsError(f"drift_min_samples must be at least 1, "
                                f"got {self.drift_min_samples}")
        if not 0.0 < self.drift_alpha < 1.0:
            raise SettingsError(f"drift_alpha must be within (0, 1), got {self.drift_alpha}")


@dataclass(frozen=True)
class ReferenceSettings:
    """How workers join orders with the live reference streams (scoring/feed.py)."""

    reference_lateness_ms: int = _setting(
        2000, "TRIAGE_REFERENCE_LATENESS_MS",
        "The lateness of reference producers you tolerate: a reference event published up to "
        "this long after the orders it applies to is still joined with them. An order whose "
        "reference partitions are quiet (nothing left to read, nothing newer than the order) "
        "waits until this long after its own time or its publication, whichever is later: it "
        "is the latency a quiet stream costs. Events later than this are corrected "
        "(TRIAGE_CORRECTION_RETENTION_S).")
    reference_max_wait_ms: int = _setting(
        5000, "TRIAGE_REFERENCE_MAX_WAIT_MS",
        "Longest an order waits for the reference streams to pass its time once the "
        "partitions holding it back have nothing left to read (a stream that never had a "
        "record, a producer stopped or a clock behind); then it is scored with what has "
        "arrived and its prediction says reference_wait_expired. At least "
        "TRIAGE_REFERENCE_LATENESS_MS.")
    max_clock_skew_ms: int = _setting(
        1000, "TRIAGE_MAX_CLOCK_SKEW_MS",
        "How far ahead of this worker's clock a reference event may be stamped and still move "
        "its partition's event time; an event stamped later (a producer clock running ahead) "
        "is applied at its own time but moves its partition only to the clock plus this. At "
        "most TRIAGE_MAX_FUTURE_SECONDS, beyond which an event is dead-lettered (zip roll-outs "
        "may be announced ahead and are never dead-lettered for it).")
    correction_retention_s: int = _setting(
        120, "TRIAGE_CORRECTION_RETENTION_S",
        "How long (wall clock) a worker keeps the orders it scored, to publish a corrected "
        "revision when a reference event arrives after them and changes their features; a "
        "later event touching an order no longer kept is counted in "
        "triage_reference_beyond_retention_total. About 400 bytes per order kept.")
    reference_retention: str = _setting(
        "", "TRIAGE_REFERENCE_RETENTION",
        "Reference history kept, in event time back from the newest record applied: seconds, "
        "or a number with s, m, h or d (30d). Each key keeps its newest record from before the "
        "cutoff. Empty: everything.")
    max_waiting_orders: int = _setting(
        10_000, "TRIAGE_MAX_WAITING_ORDERS",
        "Orders of one partition held waiting for reference data before that partition is "
        "paused (resumed as they are scored).")

    def __post_init__(self) -> None:
        _at_least_one(self, "reference_lateness_ms", "reference_max_wait_ms",
                      "max_waiting_orders", "max_clock_skew_ms", "correction_retention_s")
        if self.reference_max_wait_ms < self.reference_lateness_ms:
            raise SettingsError(
                f"TRIAGE_REFERENCE_MAX_WAIT_MS ({self.reference_max_wait_ms}) must be at least "
                f"TRIAGE_REFERENCE_LATENESS_MS ({self.reference_lateness_ms}): an order on a "
                "quiet stream waits the allowance before the max wait can end it")
        self.retention_s  # noqa: B018 -- parse now, so a bad value fails at start-up

    @property
    def retention_s(self) -> int | None:
        """TRIAGE_REFERENCE_RETENTION in seconds, or None to keep everything."""
        text = self.reference_retention.strip()
        if not text:
            return None
        units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
        number, unit = (text[:-1], text[-1]) if text[-1] in units else (text, "s")
        try:
            seconds = int(float(number) * units[unit])
        except ValueError:
            raise SettingsError(f"TRIAGE_REFERENCE_RETENTION={text!r} is not a duration such "
                                "as 3600, 90m, 12h or 30d") from None
        if seconds <= 0:
            raise SettingsError(f"TRIAGE_REFERENCE_RETENTION={text!r} must be positive")
        return seconds


SECTIONS: dict[str, type] = {"connection": ConnectionSettings, "topics": TopicSettings,
                             "scorer": ScorerSettings, "validation": ValidationSettings,
                             "drift": DriftSettings, "reference": ReferenceSettings}


@dataclass(frozen=True)
class Settings:
    """Every section, and what all processes share."""

    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    topics: TopicSettings = field(default_factory=TopicSettings)
    scorer: ScorerSettings = field(default_factory=ScorerSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    drift: DriftSettings = field(default_factory=DriftSettings)
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
    log_format: str = _setting(
        "json", "TRIAGE_LOG_FORMAT",
        "`json` (one JSON object per line) or `console`. Unset: `console` when stderr is a "
        "terminal, else `json`.")
    log_level: str = _setting("info", "TRIAGE_LOG_LEVEL", "debug, info, warning or error.")
    csv_encoding: str = _setting(
        "utf-8", "TRIAGE_CSV_ENCODING",
        "Text encoding of the input CSVs (`--encoding`), e.g. `cp1252` for files saved by "
        "Excel on Windows. UTF-8 files may start with a byte-order mark.")
    gateway_port: int = _setting(
        8000, "TRIAGE_GATEWAY_PORT", "Port `triage serve` answers HTTP on (`--port`).")
    gateway_view_s: float = _setting(
        3600.0, "TRIAGE_GATEWAY_VIEW_S",
        "How far back (seconds) `triage serve` reads the orders, predictions and dead-letter "
        "topics to answer GET /v1/predictions/{order_id}; older orders are 404.")
    gateway_max_body_bytes: int = _setting(
        4_194_304, "TRIAGE_GATEWAY_MAX_BODY_BYTES",
        "Largest HTTP request body `triage serve` reads; larger ones get 413. The default "
        "holds the largest batch, 10,000 orders.")
    mlflow_tracking_uri: str = _setting(
        "", "TRIAGE_MLFLOW_TRACKING_URI",
        "MLflow tracking server or store (`http://mlflow:5000`, `sqlite:///mlflow.db`). Set, "
        "and with `mlflow-skinny` installed, `triage train` also logs its run and registers "
        "the model there, and `triage models promote` accepts `models:/NAME/VERSION`.")
    mlflow_model_name: str = _setting(
        "triage", "TRIAGE_MLFLOW_MODEL_NAME",
        "Registered model name that `triage train` adds its versions to in MLflow.")
    mlflow_experiment: str = _setting(
        "triage", "TRIAGE_MLFLOW_EXPERIMENT", "MLflow experiment that `triage train` logs to.")

    def __post_init__(self) -> None:
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"log_level must be debug, info, warning or error, got "
                                f"{self.log_level!r}")
        if self.log_format not in ("json", "console"):
            raise SettingsError(f"log_format must be json or console, got {self.log_format!r}")
        _check_encoding(self.csv_encoding)
        for name, port, off in (("TRIAGE_GATEWAY_PORT", self.gateway_port, False),
                                ("TRIAGE_METRICS_PORT", self.scorer.metrics_port, True),
                                ("TRIAGE_DRIFT_METRICS_PORT", self.drift.drift_metrics_port,
                                 True)):
            if not (off and port == 0) and not 1 <= port <= 65_535:
                allowed = "1-65535" + (" or 0 (off)" if off else "")
                raise SettingsError(f"{name} must be a TCP port, {allowed}, got {port}")
        if 2 * self.scorer.processing_deadline_ms > self.connection.max_poll_interval_ms:
            raise SettingsError(
                f"TRIAGE_PROCESSING_DEADLINE_MS ({self.scorer.processing_deadline_ms}) must be "
                f"at most half of TRIAGE_MAX_POLL_INTERVAL_MS "
                f"({self.connection.max_poll_interval_ms}): a batch that runs past "
                "max.poll.interval.ms gets its worker evicted and is scored again by another, "
                "forever")
        if self.reference.max_clock_skew_ms > self.validation.max_future_seconds * 1000:
            raise SettingsError(
                f"TRIAGE_MAX_CLOCK_SKEW_MS ({self.reference.max_clock_skew_ms}) must be at most "
                f"TRIAGE_MAX_FUTURE_SECONDS ({self.validation.max_future_seconds}) in ms: "
                "events further ahead are dead-lettered")
        scorer, served = self.scorer, self.scorer.metrics_port or self.drift.drift_metrics_port
        turn_ms = scorer.processing_deadline_ms + scorer.delivery_timeout_ms
        if served and scorer.health_stall_ms <= turn_ms:
            raise SettingsError(
                f"TRIAGE_HEALTH_STALL_MS ({scorer.health_stall_ms}) must be more than "
                f"TRIAGE_PROCESSING_DEADLINE_MS + TRIAGE_DELIVERY_TIMEOUT_MS ({turn_ms}): a "
                "batch may take that long (hooks, then the broker's acknowledgements) without "
                "the loop being stuck")

    @classmethod
    def of(cls, **values: Any) -> Settings:
        """Settings from flat field names (``orders_topic=...``); the rest keep defaults."""
        return cls().replace(**values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``TRIAGE_*`` variables; unset ones keep their defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        fixed = {f.metadata["env"] for f, _ in _fields()}
        for variable, value in environ.items():  # TRIAGE_<STREAM>_TOPIC: a reference stream's
            match = _STREAM_TOPIC.fullmatch(variable)
            if match and variable not in fixed and value:
                values[f"{match[1].lower()}_topic"] = value
        for f, _ in _fields():
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

    def replace(self, **changes: Any) -> Settings:
        """A copy with the given fields (flat names, any section) changed; ``None`` values
        (unset flags) are ignored; ``<stream>_topic`` names a reference stream's topic
        (model/streams.py; the scorer refuses one no stream is declared for). Raises
        SettingsError for a name no section has."""
        changes = {k: v for k, v in changes.items() if v is not None}
        owner = {f.name: section for f, section in _fields()}
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
        for section, section_changes in by_section.items():
            if section is not None:
                top[section] = dataclasses.replace(getattr(self, section), **section_changes)
        return dataclasses.replace(self, **top)

    def to_env(self) -> dict[str, str]:
        """The ``TRIAGE_*`` variables that reproduce these settings in a child process."""
        env = {f.metadata["env"]: str(getattr(getattr(self, section) if section else self,
                                              f.name))
               for f, section in _fields() if not f.metadata.get("streams")}
        for stream, topic in self.topics.stream_topics:
            env[f"TRIAGE_{stream.upper()}_TOPIC"] = topic
        return env


def _fields() -> Iterator[tuple[dataclasses.Field[Any], str | None]]:
    """Every setting's field, with the name of its section (None: the top level)."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield f, section
    for f in dataclasses.fields(Settings):
        if f.name not in SECTIONS:
            yield f, None


def _check_encoding(name: str) -> None:
    try:
        codecs.lookup(name)
    except LookupError:
        raise SettingsError(f"TRIAGE_CSV_ENCODING={name!r} is not a text encoding Python "
                            "knows (e.g. utf-8, cp1252, latin-1)") from None


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


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) rows, for docs/configuration.md and `triage settings`;
    the reference streams' topics are not among them (model/streams.py lists those:
    ``stream_settings``)."""
    return [(f.metadata["env"], "" if f.name == "state_dir" else str(f.default),
             f.metadata["doc"]) for f, _ in _fields() if not f.metadata.get("streams")]
