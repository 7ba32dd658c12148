"""The scoring core's settings (scoring/): its own section (sampling, hooks, deadline), the
validation's and the reference feed's, and :class:`ScoringSettings`, what every process that
scores reads (the Kafka worker's WorkerSettings and the HTTP gateway's GatewaySettings extend
it). The machinery, and the flat ``TRIAGE_*`` variables, are bus/settings.py's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from triage.bus.settings import SettingsBase, SettingsError, at_least_one, section, setting


@dataclass(frozen=True)
class CoreSettings:
    """The scoring core's own: sampling, the hooks and their deadline, the largest record."""

    sample_rate: float = setting(
        0.05, "TRIAGE_SAMPLE_RATE",
        "Share of orders (by order_id hash) the sampler copies to the drift topic.")
    processing_deadline_ms: int = setting(
        30_000, "TRIAGE_PROCESSING_DEADLINE_MS",
        "Longest the check and observe hooks may take on one batch; orders a hook has not "
        "finished by then are dead-lettered as `timeout`. At most half of "
        "TRIAGE_MAX_POLL_INTERVAL_MS.")
    max_message_bytes: int = setting(
        16384, "TRIAGE_MAX_MESSAGE_BYTES",
        "Largest order record accepted; larger ones are dead-lettered as `oversized`.")
    hooks: str = setting(
        "", "TRIAGE_HOOKS",
        "Extra per-batch hooks, comma-separated `module:factory` (see scoring/hooks.py).")

    def __post_init__(self) -> None:
        at_least_one(self, "processing_deadline_ms", "max_message_bytes")
        if not 0.0 <= self.sample_rate <= 1.0:
            raise SettingsError(f"sample_rate must be within [0, 1], got {self.sample_rate}")


@dataclass(frozen=True)
class ValidationSettings:
    """What the built-in validation hook accepts."""

    max_field_length: int = setting(
        128, "TRIAGE_MAX_FIELD_LENGTH",
        "Longest order_id, customer_id, sku_code or zip_code accepted.")
    earliest_order_time: str = setting(
        "2000-01-01 00:00:00", "TRIAGE_EARLIEST_ORDER_TIME",
        "Orders timestamped before this (UTC) are dead-lettered as `invalid_timestamp`.")
    max_future_seconds: int = setting(
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
class ReferenceSettings:
    """How workers join orders with the live reference streams (scoring/feed.py)."""

    reference_lateness_ms: int = setting(
        2000, "TRIAGE_REFERENCE_LATENESS_MS",
        "The lateness of reference producers you tolerate: a reference event published up to "
        "this long after the orders it applies to is still joined with them. An order whose "
        "reference partitions are quiet (nothing left to read, nothing newer than the order) "
        "waits until this long after its own time or its publication, whichever is later: it "
        "is the latency a quiet stream costs. Events later than this are corrected "
        "(TRIAGE_CORRECTION_RETENTION_S).")
    reference_max_wait_ms: int = setting(
        5000, "TRIAGE_REFERENCE_MAX_WAIT_MS",
        "Longest an order waits for the reference streams to pass its time once the "
        "partitions holding it back have nothing left to read (a stream that never had a "
        "record, a producer stopped or a clock behind); then it is scored with what has "
        "arrived and its prediction says reference_wait_expired. At least "
        "TRIAGE_REFERENCE_LATENESS_MS.")
    max_clock_skew_ms: int = setting(
        1000, "TRIAGE_MAX_CLOCK_SKEW_MS",
        "How far ahead of this worker's clock a reference event may be stamped and still move "
        "its partition's event time; an event stamped later (a producer clock running ahead) "
        "is applied at its own time but moves its partition only to the clock plus this. At "
        "most TRIAGE_MAX_FUTURE_SECONDS, beyond which an event is dead-lettered (zip roll-outs "
        "may be announced ahead and are never dead-lettered for it).")
    correction_retention_s: int = setting(
        120, "TRIAGE_CORRECTION_RETENTION_S",
        "How long (wall clock) a worker keeps the orders it scored, to publish a corrected "
        "revision when a reference event arrives after them and changes their features; a "
        "later event touching an order no longer kept is counted in "
        "triage_reference_beyond_retention_total. About 400 bytes per order kept.")
    reference_retention: str = setting(
        "", "TRIAGE_REFERENCE_RETENTION",
        "Reference history kept, in event time back from the newest record applied: seconds, "
        "or a number with s, m, h or d (30d). Each key keeps its newest record from before the "
        "cutoff. Empty: everything.")
    max_waiting_orders: int = setting(
        10_000, "TRIAGE_MAX_WAITING_ORDERS",
        "Orders of one partition held waiting for reference data before that partition is "
        "paused (resumed as they are scored).")

    def __post_init__(self) -> None:
        at_least_one(self, "reference_lateness_ms", "reference_max_wait_ms",
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


@dataclass(frozen=True)
class ScoringSettings(SettingsBase):
    """What a process that scores reads: the core's, validation's and the feed's sections."""

    core: CoreSettings = section(CoreSettings)
    validation: ValidationSettings = section(ValidationSettings)
    reference: ReferenceSettings = section(ReferenceSettings)

    def check(self) -> None:
        super().check()
        if self.reference.max_clock_skew_ms > self.validation.max_future_seconds * 1000:
            raise SettingsError(
                f"TRIAGE_MAX_CLOCK_SKEW_MS ({self.reference.max_clock_skew_ms}) must be at most "
                f"TRIAGE_MAX_FUTURE_SECONDS ({self.validation.max_future_seconds}) in ms: "
                "events further ahead are dead-lettered")
