"""The reference streams, declared once.

A reference stream is state the scorer joins each order with *as of the order's time*: stock
levels per SKU, payment statuses per order, zip code roll-outs. :data:`REFERENCE_STREAMS` is the
only place one is defined; everything else is driven by the declarations:

* the tables (model/reference.py): one versioned table per stream, its values held as the
  declaration's ``kind`` says, loaded from the snapshot CSV ``csv_file`` and updated by events;
* the live reader and the event-time gate (bus/global_reader.py, scoring/feed.py): the topic
  of each stream, its contract ``schema``, its key and event-time fields, its validation;
* ``triage replay`` and ``triage produce`` (producer/), ``triage topics create`` (its partition
  count follows ``partitioning``), the topic settings (``TRIAGE_<NAME>_TOPIC``, default: the
  stream's name) and the settings table in docs/configuration.md.

Adding a stream is one declaration here plus its Avro schema in schemas/ (a test declares a
toy stream and joins it, tests/unit/test_streams.py); a feature that uses it is one
declaration in model/features.py.

**How a stream updates state.** Every stream is a versioned table (Kafka Streams' versioned
key-value store; model/asof.py): each event adds a version of its key at its event time, and a
lookup gives the latest version at or before a time, ties to the later applied
(``pandas.merge_asof(direction="backward")``). ``kind`` says what a version holds: a number
(``number``: float64, NaN when the key has none), a category (``category``: a label from a
vocabulary, ``MISSING`` when none) or nothing but its presence (``presence``: the key exists as
of the time).

**Partitioning.** ``co-partitioned``: its producers key it like the orders (payments by
``order_id``, the Java client's murmur2 partitioner), and ``triage topics create`` gives it the
orders topic's partition count; the placement is checked record by record, not relied on.
``global``: keyed by something else (a SKU, a zip code). Either way every worker reads every
partition (a Kafka Streams GlobalKTable), so a join never depends on where a record landed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from triage.bus.settings import TopicSettings

Kind = Literal["number", "category", "presence"]
Partitioning = Literal["co-partitioned", "global"]


@dataclass(frozen=True)
class ReferenceStream:
    """One reference stream (module docstring).

    ``name``: the stream's name (its table, its metrics label, its topic's default name and
    the ``TRIAGE_<NAME>_TOPIC`` setting). ``schema``: schemas/<schema>.avsc, the value's
    contract. ``key``: the record field the stream is keyed by (the Kafka key, the table key).
    ``order_key``: the order field that joins it. ``time``: the record's event-time field, UTC
    ms. ``value``: the field a version holds (None for ``presence``). ``csv_file``: the
    snapshot's file; its columns are ``key``, ``csv_time`` (``YYYY-MM-DD HH:MM:SS`` UTC) and
    ``value``. ``announced_ahead``: an event may be stamped later than now (a roll-out
    announced ahead); other streams' events happen when they are recorded.
    """

    name: str
    schema: str
    key: str
    order_key: str
    time: str
    value: str | None
    kind: Kind
    csv_file: str
    csv_time: str
    partitioning: Partitioning = "global"
    announced_ahead: bool = False
    description: str = ""  # what it holds, for the settings table: "stock levels, keyed by ..."

    def __post_init__(self) -> None:
        if (self.value is None) != (self.kind == "presence"):
            raise ValueError(f"stream {self.name}: a presence stream has no value field, "
                             "and only it")

    @property
    def co_partitioned(self) -> bool:
        return self.partitioning == "co-partitioned"

    @property
    def csv_columns(self) -> list[str]:
        """The snapshot CSV's columns this stream reads (others are ignored)."""
        return [self.key, self.csv_time, *([self.value] if self.value else [])]

    @property
    def topic_variable(self) -> str:
        """The environment variable naming its topic."""
        return f"TRIAGE_{self.name.upper()}_TOPIC"


INVENTORY = ReferenceStream(
    "inventory", schema="inventory", key="sku_code", order_key="sku_code",
    time="timestamp_ms", value="inventory", kind="number", csv_file="inventory.csv",
    csv_time="timestamp",
    description="stock levels, keyed by sku_code (every worker reads all of it).")
PAYMENTS = ReferenceStream(
    "payments", schema="payment", key="order_id", order_key="order_id", time="timestamp_ms",
    value="payment_status", kind="category", csv_file="payments.csv", csv_time="timestamp",
    partitioning="co-partitioned",
    description="payment statuses, keyed by order_id and co-partitioned with the orders topic "
                "(same partition count, the Java client's partitioner).")
ZIP_CODES = ReferenceStream(
    "zip_codes", schema="zip_code", key="zip_code", order_key="zip_code",
    time="available_from_ms", value=None, kind="presence", csv_file="zip_codes.csv",
    csv_time="available_from", announced_ahead=True,
    description="zip code roll-outs, keyed by zip_code (every worker reads all).")

#: Every reference stream, in the order tables, topics and docs list them.
REFERENCE_STREAMS: tuple[ReferenceStream, ...] = (INVENTORY, PAYMENTS, ZIP_CODES)


def by_name(streams: Sequence[ReferenceStream] = REFERENCE_STREAMS
            ) -> dict[str, ReferenceStream]:
    """name -> declaration."""
    return {s.name: s for s in streams}


def stream_settings(streams: Sequence[ReferenceStream] = REFERENCE_STREAMS
                    ) -> list[tuple[str, str, str]]:
    """(variable, default, description) rows of the streams' topic settings, for
    docs/configuration.md and `triage settings`, beside bus/settings.py's ``settings_table``."""
    return [(s.topic_variable, s.name, f"Topic of the {s.name} reference stream: {s.description}")
            for s in streams]


def reference_topic_partitions(topics: TopicSettings,
                               streams: Sequence[ReferenceStream] = REFERENCE_STREAMS
                               ) -> dict[str, int]:
    """Topic -> partition count of each stream, for ``triage topics create``
    (bus/clients.py ``create_topics``): a co-partitioned stream gets the orders topic's count
    (the documented placement, checked by the workers; they read every partition all the
    same), a global one ``TRIAGE_REFERENCE_PARTITIONS``."""
    return {topics.topic_of(s.name): topics.orders_partitions if s.co_partitioned
            else topics.reference_partitions for s in streams}

