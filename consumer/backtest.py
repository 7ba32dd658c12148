"""Backtest: a candidate model version scored over the history, before it meets live traffic
(`triage models backtest VERSION`).

"Had this candidate been active, what would it have decided, order by order, with the features
as they were then?" The history is what Kafka holds (the orders topic from ``--from`` to
``--to``, every reference stream from its beginning) or a data directory of CSVs (``--data``, no
broker). The reference state is rebuilt by the workers' own code: the reference feed applies
every event of every stream (scoring/feed.py) or the snapshot loader reads the CSVs
(model/reference.py), and each order's features are the as-of lookups of the scorer
(model/features.py), so they equal ``pandas.merge_asof`` over all the events. Unlike the live
loop, nothing waits: the whole history is known, so the reference streams are read first, to
their ends, and the orders then go through in large batches.

Each order is scored by the candidate and, when one is given, the active version; both are
compared with the policy (model/policy.py) and, for orders read from Kafka that have one, with
the last revision published on the predictions topic. The backtest publishes nothing and
commits no offset: its readers assign partitions under group ids of their own.

It streams: per batch it keeps counts (agreement, confusion, by hour and by class) and at most
:data:`EXAMPLES` orders whose decision would change, so its memory does not grow with the
number of orders (the reference tables are the workers' own, and grow with the streams).
Published predictions are kept as one byte and one short per order of the range.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from confluent_kafka import KafkaError, TopicPartition

from triage.bus.clients import make_consumer, partitions_of, records_of
from triage.bus.errors import BadRecord, ConfigurationError
from triage.model.artifact import Model
from triage.model.features import FEATURE_NAMES, WINDOWED_NAMES, FeatureBatch
from triage.model.orders import ORDER_COLUMNS, OrderColumns, orders_of_frame
from triage.model.policy import CLASSES, label
from triage.model.reference import ReferenceTables, read_csv
from triage.schemas.codec import codec_for
from triage.scoring.feed import ReferenceFeed, ReferenceReader
from triage.scoring.validation import OrderValidator

#: Most orders whose decision would change the report lists (with their features).
EXAMPLES = 1_000
#: Orders scored at once.
BATCH = 50_000
_CODE = {c: i for i, c in enumerate(CLASSES)}
_NONE = -1  # no published prediction for the order


class BacktestError(ConfigurationError):
    """A backtest that cannot run: no orders in the range, a data directory that cannot be
    read, a version that cannot be loaded. Exit status 2."""


@dataclass(frozen=True)
class Batch:
    """One batch of the history: its orders, and where each was read (partition, offset;
    -1 for a CSV row)."""

    orders: OrderColumns
    partitions: np.ndarray  # int32
    offsets: np.ndarray     # int64


@dataclass
class Tally:
    """Counts for one slice of the orders (an hour, a class): orders, agreement of the
    candidate and of the active version with the policy."""

    orders: int = 0
    candidate: int = 0
    active: int = 0

    def add(self, orders: int, candidate: int, active: int) -> None:
        self.orders += orders
        self.candidate += candidate
        self.active += active

    def as_dict(self, active: bool = True) -> dict[str, float | int | None]:
        """The slice's figures; ``active`` False: no active version was scored (None)."""
        n = self.orders or 1
        return {"orders": self.orders, "candidate_policy_agreement": self.candidate / n,
                "active_policy_agreement": self.active / n if active else None}


@dataclass
class Backtest:
    """What a backtest found, accumulated batch by batch (module docstring).

    ``candidate`` and ``active``: version ids (``active`` None: compared with the policy
    alone). Confusion matrices are indexed by model/policy.py's ``CLASSES``, rows first."""

    candidate: str
    active: str | None
    source: str
    from_ms: int | None
    to_ms: int | None
    id: str = field(default_factory=lambda: report_id())
    orders: int = 0
    total: Tally = field(default_factory=Tally)
    by_hour: dict[str, Tally] = field(default_factory=dict)
    by_class: dict[str, Tally] = field(default_factory=dict)
    candidate_vs_policy: np.ndarray = field(default_factory=lambda: _square())
    active_vs_policy: np.ndarray = field(default_factory=lambda: _square())
    active_vs_candidate: np.ndarray = field(default_factory=lambda: _square())
    published_orders: int = 0
    published_agreement: int = 0  # the candidate's decision equals the published one
    examples: list[dict[str, Any]] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)  # reason -> orders not scored
    first_ms: int | None = None
    last_ms: int | None = None
    elapsed_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def add(self, batch: Batch, features: FeatureBatch, candidate: np.ndarray,
            active: np.ndarray | None, policy: np.ndarray,
            published: np.ndarray | None = None) -> None:
        """Count one scored batch: ``candidate``, ``active`` and ``policy`` are recommendation
        arrays (object, CLASSES), ``published`` the last published one's class code per order
        (-1: none)."""
        n = len(batch.orders)
        if not n:
            return
        cand = _codes(candidate)
        pol = _codes(policy)
        act = _codes(active) if active is not None else None
        self.orders += n
        times = batch.orders.timestamp_ms
        self.first_ms = int(times.min()) if self.first_ms is None else min(self.first_ms,
                                                                           int(times.min()))
        self.last_ms = int(times.max()) if self.last_ms is None else max(self.last_ms,
                                                                         int(times.max()))
        cand_ok = cand == pol
        act_ok = act == pol if act is not None else np.zeros(n, dtype=bool)
        np.add.at(self.candidate_vs_policy, (cand, pol), 1)
        if act is not None:
            np.add.at(self.active_vs_policy, (act, pol), 1)
            np.add.at(self.active_vs_candidate, (act, cand), 1)
        self.total.add(n, int(cand_ok.sum()), int(act_ok.sum()))
        hours, slot = np.unique(times // 3_600_000, return_inverse=True)
        counts = np.bincount(slot, minlength=len(hours))
        cand_hits = np.bincount(slot, weights=cand_ok, minlength=len(hours))
        act_hits = np.bincount(slot, weights=act_ok, minlength=len(hours))
        for i, hour in enumerate(hours.tolist()):
            key = datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y-%m-%dT%H:00Z")
            self.by_hour.setdefault(key, Tally()).add(int(counts[i]), int(cand_hits[i]),
                                                      int(act_hits[i]))
        for code in np.unique(pol).tolist():
            rows = pol == code
            self.by_class.setdefault(CLASSES[code], Tally()).add(
                int(rows.sum()), int(cand_ok[rows].sum()), int(act_ok[rows].sum()))
        if published is not None:
            known = published != _NONE
            self.published_orders += int(known.sum())
            self.published_agreement += int((published[known] == cand[known]).sum())
        changed = np.flatnonzero((cand != act) if act is not None else (cand != pol))
        for row in changed[:max(0, EXAMPLES - len(self.examples))].tolist():
            self.examples.append({
                "order_id": batch.orders.order_id[row],
                "timestamp_ms": int(times[row]),
                "candidate": CLASSES[cand[row]],
                "active": CLASSES[act[row]] if act is not None else None,
                "policy": CLASSES[pol[row]],
                "features": {name: _plain(features.columns[name][row])
                             for name in FEATURE_NAMES if name not in WINDOWED_NAMES}})

    def policy_agreement(self, which: str) -> float | None:
        """The share (0..1) of orders on which ``which`` (``candidate`` or ``active``) agreed
        with the policy; None for an active version not scored, or no orders."""
        if not self.orders or (which == "active" and self.active is None):
            return None
        return (self.total.candidate if which == "candidate" else self.total.active) \
            / self.orders

    def changed_by_class(self) -> dict[str, dict[str, int]]:
        """active class -> candidate class -> orders whose decision would change so."""
        return {CLASSES[a]: {CLASSES[c]: int(self.active_vs_candidate[a, c])
                             for c in range(len(CLASSES))
                             if c != a and self.active_vs_candidate[a, c]}
                for a in range(len(CLASSES)) if self.active_vs_candidate[a].sum()
                - self.active_vs_candidate[a, a]}

    def as_dict(self) -> dict[str, Any]:
        """The report (the JSON file's contents; ``triage models promote --require-backtest``
        reads it back)."""
        return {
            "id": self.id, "candidate": self.candidate, "active": self.active,
            "source": self.source, "from_ms": self.from_ms, "to_ms": self.to_ms,
            "first_order_ms": self.first_ms, "last_order_ms": self.last_ms,
            "orders": self.orders, "elapsed_s": round(self.elapsed_s, 3),
            "orders_per_s": round(self.orders / self.elapsed_s) if self.elapsed_s else None,
            "candidate_policy_agreement": self.policy_agreement("candidate"),
            "active_policy_agreement": self.policy_agreement("active"),
            "published_orders": self.published_orders,
            "published_agreement": (self.published_agreement / self.published_orders
                                    if self.published_orders else None),
            "classes": list(CLASSES),
            "confusion": {"candidate_vs_policy": self.candidate_vs_policy.tolist(),
                          "active_vs_policy": self.active_vs_policy.tolist(),
                          "active_vs_candidate": self.active_vs_candidate.tolist()},
            "changed_by_class": self.changed_by_class(),
            "by_hour": {k: v.as_dict(self.active is not None)
                        for k, v in sorted(self.by_hour.items())},
            "by_class": {k: v.as_dict(self.active is not None)
                         for k, v in sorted(self.by_class.items())},
            "refused": dict(self.refused),
            "examples": self.examples, "examples_limit": EXAMPLES,
            "warnings": self.warnings,
        }


def report_id() -> str:
    """A new report's id: ``bt-`` and the UTC time to the millisecond, then 6 random hex
    digits (``bt-20261206T190455.123Z-3fa2c1``): ids sort by the time they were made."""
    now = datetime.now(UTC)
    return f"bt-{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{uuid.uuid4().hex[:6]}"


def _square() -> np.ndarray:
    return np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)


def _codes(recommendations: np.ndarray) -> np.ndarray:
    return np.fromiter((_CODE[r] for r in recommendations.tolist()), dtype=np.int64,
                       count=len(recommendations))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and value != value else value


# -- scoring ------------------------------------------------------------------------------------

def run(candidate: Model, active: Model | None, tables: ReferenceTables,
        batches: Iterator[Batch], result: Backtest, *,
        published: Callable[[Batch], np.ndarray | None] = lambda batch: None,
        on_batch: Callable[[Batch, FeatureBatch, np.ndarray], None] | None = None,
        progress: Callable[[int], object] = lambda n: None,
        validator: OrderValidator | None = None) -> Backtest:
    """Score every batch with ``candidate`` (and ``active``) on features as of each order's
    time from ``tables``, and count it into ``result``. With ``validator`` (the workers'),
    an order the workers would dead-letter is not scored but counted in ``result.refused`` by
    reason. ``on_batch(batch, features,
    candidate's recommendations)`` sees every batch (the tests compare the features with an
    offline join); ``progress(n)`` is called with each batch's size.

    Raises ConfigurationError for a model that reads windowed features: their windows reach
    back past a batch, and a backtest that scored them from one batch would be wrong without
    saying so; it is not supported yet."""
    for model in (candidate, active):
        if model is not None and model.windowed:
            raise ConfigurationError(
                f"model {model.version} reads windowed features ({', '.join(model.windowed)}); "
                "backtests of such models are not supported yet (their windows reach back "
                "past a batch of the history): compare it in shadow instead")
    started = time.monotonic()
    for batch in batches:
        if validator is not None:
            batch = _valid(batch, validator, result)
        features = batch.orders.features(tables)
        ours, _ = candidate.predict(features)
        theirs = active.predict(features)[0] if active is not None else None
        result.add(batch, features, ours, theirs, label(features), published(batch))
        if on_batch is not None:
            on_batch(batch, features, ours)
        progress(len(batch.orders))
    result.elapsed_s = time.monotonic() - started
    return result


def _valid(batch: Batch, validator: OrderValidator, result: Backtest) -> Batch:
    """``batch`` without the orders ``validator`` refuses (counted in ``result.refused``)."""
    refused = list(validator.check(batch.orders.records()))
    if not refused:
        return batch
    keep = np.ones(len(batch.orders), dtype=bool)
    for rejection in refused:
        keep[rejection.index] = False
        result.refused[rejection.reason] = result.refused.get(rejection.reason, 0) + 1
    return Batch(_subset(batch.orders, keep), batch.partitions[keep], batch.offsets[keep])


def within(orders: OrderColumns, from_ms: int | None, to_ms: int | None) -> np.ndarray:
    """bool: the orders whose time is in [from_ms, to_ms] (either bound None: open)."""
    keep = np.ones(len(orders), dtype=bool)
    if from_ms is not None:
        keep &= orders.timestamp_ms >= from_ms
    if to_ms is not None:
        keep &= orders.timestamp_ms <= to_ms
    return keep


def _subset(orders: OrderColumns, keep: np.ndarray) -> OrderColumns:
    rows = np.flatnonzero(keep).tolist()
    return OrderColumns(order_id=[orders.order_id[i] for i in rows],
                        customer_id=[orders.customer_id[i] for i in rows],
                        sku_code=[orders.sku_code[i] for i in rows],
                        zip_code=[orders.zip_code[i] for i in rows],
                        timestamp_ms=orders.timestamp_ms[keep])


# -- a data directory ---------------------------------------------------------------------------

def data_history(data_dir: Path, *, encoding: str = "utf-8", from_ms: int | None = None,
                 to_ms: int | None = None, batch: int = BATCH
                 ) -> tuple[ReferenceTables, Iterator[Batch]]:
    """The reference tables of ``data_dir``'s CSVs (all their rows) and its orders.csv in
    batches of ``batch`` rows, read as they are scored (rows whose timestamp is not
    ``YYYY-MM-DD HH:MM:SS`` are left out, as the replay leaves them out). Raises
    ReferenceDataError for a reference file that cannot be read or an orders.csv without its
    columns; for a row of orders.csv that cannot be read (a byte not in ``encoding``, a line
    of too many fields), the iteration raises it, naming the line, when it reaches the row."""
    import pandas as pd

    tables = ReferenceTables.load(data_dir, encoding)
    path = data_dir / "orders.csv"
    python_encoding = ("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8")
                       else encoding)
    # The header is checked now (read_csv's errors, before scoring); the rows are read, and
    # checked, batch by batch: reading the whole file first held every order in memory at once.
    try:
        header = pd.read_csv(path, dtype=str, nrows=0, encoding=python_encoding)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError):
        header = None
    if header is None or any(c not in header.columns for c in ORDER_COLUMNS):
        read_csv(path, ORDER_COLUMNS, encoding)  # raises ReferenceDataError, naming the file

    def batches() -> Iterator[Batch]:
        try:
            # All columns, not usecols: a line of too many fields must be refused, as
            # read_csv refuses it, not cut to the columns.
            for frame in pd.read_csv(path, dtype=str, keep_default_na=False,
                                     encoding=python_encoding, chunksize=batch):
                orders = orders_of_frame(frame[ORDER_COLUMNS].fillna(""))
                keep = within(orders, from_ms, to_ms)
                if not keep.all():
                    orders = _subset(orders, keep)
                n = len(orders)
                yield Batch(orders, np.full(n, -1, dtype=np.int32),
                            np.full(n, -1, dtype=np.int64))
        except (UnicodeDecodeError, pd.errors.ParserError):
            read_csv(path, ORDER_COLUMNS, encoding)  # raises ReferenceDataError, with the line
            raise

    return tables, batches()


# -- Kafka --------------------------------------------------------------------------------------

@dataclass
class KafkaHistory:
    """What a backtest reads from Kafka: the reference state rebuilt from every stream, the
    orders of the range by batch, and the predictions last published for them."""

    tables: ReferenceTables
    warnings: list[str]
    batches: Iterator[Batch]
    published: Callable[[Batch], np.ndarray | None]


def kafka_history(settings: Any, *, from_ms: int | None = None, to_ms: int | None = None,
                  batch: int = BATCH, log: Any = None) -> KafkaHistory:
    """The history in Kafka (module docstring), for ``settings`` (a WorkerSettings: the
    connection, topics, validation and reference sections). Reads every reference stream to
    its end first (a partition whose history begins after offset 0 was cut by retention: a
    warning says so), then the predictions topic from ``from_ms`` (by record timestamp) to its
    end, then yields the orders of each partition from the offset for ``from_ms`` to the
    partition's end, keeping those whose own time is within [from_ms, to_ms]. Raises
    InfrastructureError or KafkaException when the broker cannot be read."""
    log = log or structlog.get_logger("backtest")
    # Every event kept: TRIAGE_REFERENCE_RETENTION trims a long-running worker's tables, but a
    # backtest's features are merge_asof over all the history it reads.
    feed = ReferenceFeed(ReferenceTables.empty(),
                         dataclasses.replace(settings.reference, reference_retention=""),
                         OrderValidator(settings.validation), snapshot=False, log=log)
    reader = ReferenceReader(settings.connection, settings.topics, feed, log=log)
    warnings: list[str] = []
    try:
        reader.start()
        letters = reader.restore()
        if letters:
            warnings.append(f"{len(letters)} reference records could not be applied (the "
                            "workers dead-letter them too)")
        for (stream, partition), progress in sorted(feed.progress.items()):
            if progress.low > 0 and progress.high > progress.low:
                warnings.append(f"{stream} partition {partition} begins at offset "
                                f"{progress.low}: retention removed its earlier events, so "
                                "orders before them may see less history than the workers "
                                "saw")
        for topic in sorted(reader.reader.missing):
            warnings.append(f"reference topic {topic} does not exist: every order's feature "
                            "from it is missing (as a worker's would be)")
    finally:
        reader.close()
    topics = settings.topics
    connection = settings.connection
    consumer = make_consumer(connection, f"triage-backtest-{uuid.uuid4().hex}",
                             **{"enable.partition.eof": True})
    # By record timestamp (publication), back by how far ahead of its publication an order may
    # be stamped (TRIAGE_MAX_FUTURE_SECONDS); the orders' own times are then filtered.
    seek_ms = None if from_ms is None else from_ms - settings.validation.max_future_seconds * 1000
    starts = _starts(consumer, topics.orders_topic, seek_ms)
    published = _Published(connection, topics.predictions_topic, seek_ms,
                           {tp.partition: tp.offset for tp in starts}, log)
    codec = codec_for(connection, "order", topics.orders_topic)

    def batches() -> Iterator[Batch]:
        try:
            records: list[dict[str, Any]] = []
            where: list[tuple[int, int]] = []
            # A record that does not decode was dead-lettered by the workers: nothing to compare.
            for msg, record in _read_to_end(consumer, starts, codec, log):
                if (from_ms is None or record["timestamp_ms"] >= from_ms) and \
                        (to_ms is None or record["timestamp_ms"] <= to_ms):
                    records.append(record)
                    where.append((msg.partition() or 0, msg.offset() or 0))
                if len(records) >= batch:
                    yield _batch(records, where)
                    records, where = [], []
            if records:
                yield _batch(records, where)
        finally:
            consumer.close()

    return KafkaHistory(feed.tables, warnings, batches(), published.of)


def _read_to_end(consumer: Any, starts: list[TopicPartition], codec: Any, log: Any
                 ) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(message, decoded record) of every record from ``starts`` until each partition reports
    its end (``enable.partition.eof``); records that do not decode are skipped."""
    consumer.assign(starts)
    reading = {tp.partition for tp in starts}
    while reading:
        polled = consumer.consume(10_000, 1.0)
        for msg in polled:
            err = msg.error()
            if err is not None and err.code() == KafkaError._PARTITION_EOF:
                reading.discard(msg.partition())
        for msg in records_of(polled, log):
            try:
                yield msg, codec.decode(msg.value())
            except BadRecord:
                continue


def _batch(records: list[dict[str, Any]], where: list[tuple[int, int]]) -> Batch:
    coordinates = np.array(where, dtype=np.int64).reshape(-1, 2)
    return Batch(OrderColumns.from_records(records), coordinates[:, 0].astype(np.int32),
                 coordinates[:, 1])


def _starts(consumer: Any, topic: str, from_ms: int | None) -> list[TopicPartition]:
    """Every partition of ``topic`` at the offset for ``from_ms`` (the first record with a
    timestamp at or after it; without one, its earliest offset: its low watermark, which
    retention moves)."""
    partitions = partitions_of(consumer, topic)
    if from_ms is None:
        return [TopicPartition(topic, tp.partition,
                               consumer.get_watermark_offsets(tp, timeout=30.0)[0])
                for tp in partitions]
    found = consumer.offsets_for_times(
        [TopicPartition(topic, tp.partition, from_ms) for tp in partitions], timeout=30.0)
    # -1: no record at or after the time: nothing of that partition is in the range.
    return [tp for tp in found if tp.offset >= 0]


class _Published:
    """The last published revision of each order of the range, read from the predictions
    topic (from ``from_ms`` by record timestamp: a prediction is published after its order)
    to its end: per orders partition, from the range's first offset ``starts[partition]``, a
    class code (int8) and a revision (int16) per offset: three bytes an order."""

    def __init__(self, connection: Any, topic: str, from_ms: int | None,
                 starts: dict[int, int], log: Any) -> None:
        self.starts = starts
        self.codes: dict[int, np.ndarray] = {}
        self.revisions: dict[int, np.ndarray] = {}
        consumer = make_consumer(connection, f"triage-backtest-{uuid.uuid4().hex}",
                                 **{"enable.partition.eof": True})
        try:
            begin = _starts(consumer, topic, from_ms)
        except Exception as exc:  # no predictions topic: nothing to compare with
            log.warning("backtest_no_predictions", topic=topic, error=str(exc))
            consumer.close()
            return
        codec = codec_for(connection, "prediction", topic)
        try:
            for _, p in _read_to_end(consumer, begin, codec, log):
                self._keep(p["order_partition"], p["order_offset"],
                           _CODE[p["recommendation"]], p["revision"])
        finally:
            consumer.close()

    def _keep(self, partition: int, offset: int, code: int, revision: int) -> None:
        start = self.starts.get(partition)
        if start is None or offset < start:  # the HTTP door's (-1), or before the range
            return
        at = offset - start
        codes = self.codes.get(partition)
        if codes is None or at >= len(codes):
            size = max(1024, 2 * (at + 1))
            grown = np.full(size, _NONE, dtype=np.int8)
            revisions = np.zeros(size, dtype=np.int16)
            if codes is not None:
                grown[:len(codes)] = codes
                revisions[:len(codes)] = self.revisions[partition]
            self.codes[partition], self.revisions[partition] = grown, revisions
            codes = grown
        if revision >= self.revisions[partition][at]:
            codes[at] = code
            self.revisions[partition][at] = min(revision, 32_767)

    def of(self, batch: Batch) -> np.ndarray | None:
        """The published class code of each order of ``batch`` (-1: none); None when the
        predictions topic held nothing for the range."""
        if not self.codes:
            return None
        out = np.full(len(batch.orders), _NONE, dtype=np.int64)
        for partition in np.unique(batch.partitions).tolist():
            codes = self.codes.get(partition)
            if codes is None:
                continue
            rows = np.flatnonzero(batch.partitions == partition)
            at = batch.offsets[rows] - self.starts[partition]
            inside = (at >= 0) & (at < len(codes))
            out[rows[inside]] = codes[at[inside]]
        return out


def write(result: Backtest, out_dir: Path) -> Path:
    """Write the report as ``<out_dir>/<id>.json``; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result.id}.json"
    path.write_text(json.dumps(result.as_dict(), indent=1))
    return path
