"""Windowed features: an entity's behaviour over time (how many orders this customer placed in
the last hour, how many distinct zips it used in the last 7 days, seconds since its previous
order), declared once and computed two ways from the same declaration:

* **offline**, over a whole history at once, with pandas (:func:`offline_values`): what
  training computes, point in time, for every order;
* **online**, one order at a time, from a state keyed by entity (:class:`WindowState`): what a
  scorer computes as orders arrive, and what its changelog will restore.

Both follow the one rule below, and the tests hold them to a third, brute-force reading of it
(tests/unit/test_windows.py), under arrival in any order.

**The window rule.** Orders are ordered by ``(timestamp_ms, order_id)``: time first (UTC
milliseconds), ties at one millisecond by ``order_id`` as a string. An order ``o`` at time
``T`` sees the orders of its entity (same value of ``entity``) that come *before* it in that
order, and with ``include_self`` itself too. Of those, ``count`` and ``distinct_count`` take
the ones at times in ``(T - window_ms, T]`` (the window is half-open: an order exactly
``window_ms`` earlier is out); ``seconds_since_last`` takes the latest one before ``o`` and
gives ``(T - its time) / 1000`` if it lies in that window, else null (``window_ms`` is then the
maximum lookback). An order whose entity value is empty counts for nobody and gets the
missing value (0, or null for ``seconds_since_last``).

**An order counts once for its entity.** Records of one ``order_id`` with one entity value
are one order (Kafka delivers at least once, a replay publishes again): of them the earliest
stands, on a tie the one whose ``(customer_id, sku_code, zip_code)`` is smallest, and it is
that record's time (and counted value) that counts. A later record of the same order changes
nothing; an earlier one replaces it. Every record of the order with that entity value gets
the value of the record that stands. Records of one ``order_id`` that disagree on the entity
value (a producer that changed an order's customer) are one order *of each* entity value:
online, each entity's state is reached through a repartition topic keyed by the entity
(consumer/window_stage.py) and cannot see the others, so the rule does not ask it to.

Entity and ``of`` values are strings, as ``order.avsc`` has them (a None is read as the empty
string); times are UTC milliseconds within the tables' range (1900 to 2400).

**What the online state needs from its caller.** The value of an order is right once every
order before it has been added: the feature stage's task asks only once every orders
partition has passed the order's time (the event-time rule of the live join,
scoring/feed.py). ``expire(horizon_ms)`` forgets what no order at or after ``horizon_ms`` can
see; an order that stands before the horizon is then refused (:class:`Expired`), never
answered from a window that lost orders. It remembers which record of an order stands until
``dedup_ms`` after the order's latest record's time has left the windows: records of one
order more than that apart are beyond what it can join (the feature stage sets it so that
a store's state, one for all its features, forgets an order when the store's task does:
scoring/window_task.py, TRIAGE_WINDOW_RETENTION_S).

The feature stage (consumer/window_stage.py, ``triage windows``) computes them on Kafka; the
scorer joins its answers into the predictions of a model trained on them
(``triage train --windowed``: scoring/windowed.py), and training computes them with
:func:`offline_values` (model/orders.py).
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from triage.bus.errors import BadRecord

if TYPE_CHECKING:  # offline_values needs pandas; a serving process never imports it
    import pandas as pd
from triage.bus.settings import TopicSettings

Aggregation = Literal["count", "distinct_count", "seconds_since_last"]
AGGREGATIONS: tuple[str, ...] = ("count", "distinct_count", "seconds_since_last")
ORDER_FIELDS = frozenset({"order_id", "customer_id", "sku_code", "zip_code"})
TIE_BREAK = ("customer_id", "sku_code", "zip_code")  # of one order's records at one time
MAX_WINDOW_MS = 2**62  # about 146,000 years: keeps every time - window within int64


@dataclass(frozen=True)
class WindowedFeature:
    """One windowed feature of orders (module docstring: the window rule).

    ``name``: the feature's name, as it will appear in the features record; ``entity``: the
    order field that keys the state (``customer_id``, ``sku_code``, ``zip_code``);
    ``aggregation``: ``count`` (orders, int), ``distinct_count`` (distinct values of ``of``,
    int) or ``seconds_since_last`` (float seconds, or None); ``window_ms``: the window's length
    in milliseconds, or ``seconds_since_last``'s maximum lookback; ``of``: the field
    ``distinct_count`` counts; ``include_self``: the order itself counts (not for
    ``seconds_since_last``). Raises ValueError for a declaration that breaks these rules."""

    name: str
    entity: str
    aggregation: Aggregation
    window_ms: int
    of: str | None = None
    include_self: bool = False

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"{self.name}: aggregation {self.aggregation!r} is not one of "
                             f"{', '.join(AGGREGATIONS)}")
        if self.entity not in ORDER_FIELDS - {"order_id"}:
            raise ValueError(f"{self.name}: entity {self.entity!r} is not an order field "
                             "(customer_id, sku_code, zip_code)")
        if (not isinstance(self.window_ms, int) or isinstance(self.window_ms, bool)
                or not 0 < self.window_ms <= MAX_WINDOW_MS):
            raise ValueError(f"{self.name}: window_ms must be a positive int of milliseconds, "
                             f"at most {MAX_WINDOW_MS}")
        if (self.aggregation == "distinct_count") != (self.of is not None):
            raise ValueError(f"{self.name}: 'of' names the counted field of a distinct_count, "
                             "and only of one")
        if self.of is not None and self.of not in ORDER_FIELDS:
            raise ValueError(f"{self.name}: of {self.of!r} is not an order field")
        if self.include_self and self.aggregation == "seconds_since_last":
            raise ValueError(f"{self.name}: seconds_since_last never includes the order itself")

    @property
    def missing(self) -> Any:
        """The value of an order that has none: null for seconds_since_last, else 0."""
        return None if self.aggregation == "seconds_since_last" else 0


# --- Offline: a whole history at once --------------------------------------------------------

def offline_values(orders: pd.DataFrame, feature: WindowedFeature) -> list[Any]:
    """The feature's value for every row of ``orders`` (columns ``order_id``,
    ``timestamp_ms`` (int64 UTC ms), ``customer_id``, ``sku_code``, ``zip_code``), in the
    rows' order, computed over those same orders: counts as int, seconds as float or None.
    Rows of one ``order_id`` and entity value are one order: each gets the value of the record
    that stands (module docstring). O(n log n), with a Python loop over entities."""
    if len(orders) == 0:
        return []
    frame = orders[["order_id", "timestamp_ms", *TIE_BREAK]].reset_index(drop=True)
    frame["timestamp_ms"] = frame["timestamp_ms"].astype(np.int64)
    for name in TIE_BREAK:
        frame[name] = frame[name].fillna("")
    # The records that stand: each (order_id, entity)'s earliest, on a tie the smallest content.
    entity = feature.entity
    events = frame[frame[entity] != ""].sort_values(
        ["order_id", "timestamp_ms", *TIE_BREAK], kind="stable").drop_duplicates(
        ["order_id", entity], keep="first").sort_values(["timestamp_ms", "order_id"],
                                                        kind="stable")
    found: dict[tuple[Any, Any], Any] = {}
    for value, group in events.groupby(entity, sort=False):
        found.update(zip(((order_id, value) for order_id in group["order_id"].tolist()),
                         _group_values(feature, group["timestamp_ms"].to_numpy(dtype=np.int64),
                                       group[feature.of].tolist() if feature.of else None),
                         strict=True))
    return [found.get(key, feature.missing)
            for key in zip(frame["order_id"].tolist(), frame[entity].tolist(), strict=True)]


def _group_values(feature: WindowedFeature, times: np.ndarray, of: list[Any] | None
                  ) -> list[Any]:
    """The values of one entity's standing orders, sorted by (time, id): order ``i`` sees
    orders ``start[i]`` to ``i - 1`` (those after ``T - window_ms``)."""
    start = np.searchsorted(times, times - feature.window_ms, side="right")  # time > T - w
    before = np.arange(len(times))
    if feature.aggregation == "count":
        counts: list[Any] = (before - start + (1 if feature.include_self else 0)).tolist()
        return counts
    if feature.aggregation == "seconds_since_last":
        previous = np.concatenate([[0], times[:-1]])
        return [(t - p) / 1000.0 if i > s else None for i, s, t, p in zip(
            before.tolist(), start.tolist(), times.tolist(), previous.tolist(), strict=True)]
    assert of is not None
    # Distinct values over a sliding window: the start only moves forward as times grow.
    seen: Counter[Any] = Counter()
    low, out = 0, []
    for i, s in enumerate(start.tolist()):
        while low < s:
            seen[of[low]] -= 1
            if not seen[of[low]]:
                del seen[of[low]]
            low += 1
        if feature.include_self:
            out.append(len(seen) + (of[i] not in seen))
        else:
            out.append(len(seen))
        seen[of[i]] += 1
    return out


def rank_of(order: Mapping[str, Any]) -> tuple[Any, ...]:
    """``(timestamp_ms, customer_id, sku_code, zip_code)`` of an order record, None read as
    "": of an order's records with one entity value, the smallest stands (module docstring)."""
    customer, sku, zip_code = order["customer_id"], order["sku_code"], order["zip_code"]
    return (int(order["timestamp_ms"]), "" if customer is None else customer,  # TIE_BREAK
            "" if sku is None else sku, "" if zip_code is None else zip_code)


class Expired(BadRecord):
    """The order stands before the state's horizon: the orders its window holds may have been
    forgotten (:meth:`WindowState.expire`). Its value is the one published for it then (the
    scorer keeps it with the order: scoring/corrections.py). Reason ``window_expired``."""

    def __init__(self, message: str) -> None:
        super().__init__("window_expired", message)


class WindowState:
    """The online state of a store: the windowed features of one entity, computed from one
    index. Per entity value, its standing orders as a sorted list of ``(timestamp_ms,
    order_id, of)`` (``of``: the standing record's values of the fields the distinct counts
    count, a tuple, empty when there are none), and which record of each (order, entity value)
    stands.
    :meth:`add` an order record, :meth:`values` of an order once every order before it has
    been added, :meth:`expire` what no later order can see. ``features``: one declaration, or
    several of one entity (the state keeps what the longest window needs). Memory: one tuple
    per order in the longest window (or lookback) per entity, and each order's standing
    record until ``dedup_ms`` (default: the longest window) after its latest record has left
    the windows. A value costs O(log n) per feature, a distinct count also O(orders in its
    window). Raises ValueError for no features, or features of several entities."""

    def __init__(self, features: WindowedFeature | Sequence[WindowedFeature],
                 dedup_ms: int | None = None) -> None:
        self.features = ((features,) if isinstance(features, WindowedFeature)
                         else tuple(features))
        if not self.features or len({f.entity for f in self.features}) != 1:
            raise ValueError("a window state takes the features of one entity, at least one")
        self.entity = self.features[0].entity
        self.window_ms = max(f.window_ms for f in self.features)
        self.dedup_ms = self.window_ms if dedup_ms is None else dedup_ms
        if self.dedup_ms < 0:
            raise ValueError("dedup_ms must not be negative")
        # The fields the distinct counts count, once each; a feature's place among them.
        self.of_fields = tuple(dict.fromkeys(f.of for f in self.features if f.of))
        self._plan = tuple((f.aggregation, f.window_ms, f.include_self,
                            self.of_fields.index(f.of) if f.of else -1)
                           for f in self.features)
        self.entities: dict[str, list[tuple[int, str, tuple[Any, ...]]]] = {}
        # (order_id, entity) -> (rank: time and the tie-break fields, of, latest record's time)
        self.standing: dict[tuple[str, str], tuple[tuple[Any, ...], tuple[Any, ...], int]] = {}
        self.horizon = -(2**63)  # orders standing before it are not asked (expire)
        self._entries_by_time: list[tuple[int, str, str]] = []  # heap: (time, order_id, entity)
        # heap: (latest time, order_id, entity)
        self._orders_by_time: list[tuple[int, str, str]] = []

    def __len__(self) -> int:
        return len(self.standing)

    def _of(self, order: Mapping[str, Any]) -> tuple[Any, ...]:
        if not self.of_fields:
            return ()
        return tuple(["" if order[f] is None else order[f] for f in self.of_fields])

    def add(self, order: Mapping[str, Any], rank: tuple[Any, ...] | None = None) -> bool:
        """Add an order record (``order.avsc``'s fields; ``rank``: its :func:`rank_of`, if the
        caller has it); False when it changes no value at or after the horizon: an
        earlier-standing record of the same order and entity value is held, the entity is
        empty, or the record is too old for any window at or after the horizon."""
        order_id = order["order_id"]
        rank = rank_of(order) if rank is None else rank
        time, entity = rank[0], rank[1 + TIE_BREAK.index(self.entity)]
        if entity == "":
            return False  # counts for nobody, and its value is the missing one
        key = (order_id, entity)
        prior = self.standing.get(key)
        latest = time if prior is None else max(prior[2], time)
        heapq.heappush(self._orders_by_time, (latest, order_id, entity))
        if prior is not None:
            if prior[0] <= rank:
                self.standing[key] = (prior[0], prior[1], latest)
                return False
            self._drop(entity, prior[0][0], order_id)
        of = self._of(order)
        self.standing[key] = (rank, of, latest)
        if time <= self.horizon - self.window_ms:
            return prior is not None
        bisect.insort(self.entities.setdefault(entity, []), (time, order_id, of))
        heapq.heappush(self._entries_by_time, (time, order_id, entity))
        return True

    def load(self, records: Iterable[tuple[Mapping[str, Any], tuple[Any, ...], int]]) -> int:
        """Fill a new state in bulk: ``(order, rank, latest)`` per (order, entity value), the
        record that stands, its :func:`rank_of` and the latest time of the order's records
        (UTC ms), as :meth:`add` of the
        one and then of a record at ``latest`` would leave it, at a fraction of the cost
        (a restore: scoring/window_task.py). Records with an empty entity are skipped, as
        :meth:`add` skips them. Returns the orders loaded. Raises ValueError if the state
        holds anything, or if two records are of one (order, entity value)."""
        if self.standing or self.entities:
            raise ValueError("load() fills a new state")
        position = 1 + TIE_BREAK.index(self.entity)
        standing, entities = self.standing, self.entities
        entries_by_time, orders_by_time = self._entries_by_time, self._orders_by_time
        for order, rank, latest in records:
            entity = rank[position]
            if entity == "":
                continue
            order_id, time = order["order_id"], rank[0]
            if (order_id, entity) in standing:
                raise ValueError(f"order {order_id} of {entity!r} loaded twice")
            of = self._of(order)
            latest = max(latest, time)
            standing[(order_id, entity)] = (rank, of, latest)
            entities.setdefault(entity, []).append((time, order_id, of))
            entries_by_time.append((time, order_id, entity))
            orders_by_time.append((latest, order_id, entity))
        for entries in entities.values():
            entries.sort()
        heapq.heapify(entries_by_time)
        heapq.heapify(orders_by_time)
        return len(standing)

    def _drop(self, entity: str, time: int, order_id: str) -> None:
        entries = self.entities.get(entity)
        if entries is None:
            return
        at = bisect.bisect_left(entries, (time, order_id))
        if at < len(entries) and entries[at][:2] == (time, order_id):
            del entries[at]
        if not entries:
            del self.entities[entity]

    def values(self, order: Mapping[str, Any]) -> tuple[Any, ...]:
        """Every feature's value for ``order`` (in the order of ``features``), from the orders
        added so far: that of the standing record of its order_id and entity value (its own
        if none was added); the missing values for an empty entity. Raises :class:`Expired`
        for an order that stands before the horizon."""
        order_id = order["order_id"]
        entity = "" if order[self.entity] is None else order[self.entity]
        if entity == "":  # counts for nobody, whatever the horizon
            return tuple(f.missing for f in self.features)
        standing = self.standing.get((order_id, entity))
        if standing is None:  # not added: as it would stand
            time, own = int(order["timestamp_ms"]), self._of(order)
        else:
            time, own = standing[0][0], standing[1]
        if time < self.horizon:
            raise Expired(f"order {order_id} at {time} stands before the horizon "
                          f"{self.horizon} (UTC ms) of {', '.join(f.name for f in self.features)}")
        entries = self.entities.get(entity, [])
        before = bisect.bisect_left(entries, (time, order_id))
        out: list[Any] = []
        for aggregation, window_ms, include_self, of in self._plan:
            start = bisect.bisect_left(entries, (time - window_ms + 1,))
            if aggregation == "count":
                out.append(before - start + (1 if include_self else 0))
            elif aggregation == "seconds_since_last":
                out.append((time - entries[before - 1][0]) / 1000.0 if before > start else None)
            else:
                seen = {entry[2][of] for entry in entries[start:before]}
                if include_self:
                    seen.add(own[of])
                out.append(len(seen))
        return tuple(out)

    def value(self, order: Mapping[str, Any]) -> Any:
        """The value of a state of one feature (:meth:`values`). Raises ValueError for a state
        of several, :class:`Expired` as :meth:`values` does."""
        if len(self.features) != 1:
            raise ValueError("value() is for a state of one feature: use values()")
        return self.values(order)[0]

    def expire(self, horizon_ms: int) -> int:
        """The caller will ask no order that stands before ``horizon_ms`` (UTC ms): forget the
        orders no order at or after it can see (at or before ``horizon_ms`` less the longest
        window), and which record of an order stands once its latest record is ``dedup_ms``
        older than that. Returns how many orders left the windows. O(log n) an order
        forgotten."""
        self.horizon = max(self.horizon, horizon_ms)
        cutoff = self.horizon - self.window_ms
        gone = 0
        entries = self._entries_by_time
        while entries and entries[0][0] <= cutoff:
            time, order_id, entity = heapq.heappop(entries)
            before = len(self.entities.get(entity, ()))
            self._drop(entity, time, order_id)
            gone += before - len(self.entities.get(entity, ()))
        forget, orders = cutoff - self.dedup_ms, self._orders_by_time
        while orders and orders[0][0] <= forget:
            latest, order_id, entity = heapq.heappop(orders)
            standing = self.standing.get((order_id, entity))
            if standing is not None and standing[2] == latest:
                self._drop(entity, standing[0][0], order_id)
                del self.standing[(order_id, entity)]
        return gone


def online_values(orders: Iterable[Mapping[str, Any]], feature: WindowedFeature
                  ) -> list[Any]:
    """Every order's value from a :class:`WindowState` that is given all of ``orders`` first:
    what the scorer gives once its watermark has passed them all."""
    records = list(orders)
    state = WindowState(feature)
    for record in records:
        state.add(record)
    return [state.value(record) for record in records]


HOUR_MS, DAY_MS = 3_600_000, 86_400_000

WINDOWED_FEATURES: tuple[WindowedFeature, ...] = (
    WindowedFeature("customer_orders_1h", "customer_id", "count", HOUR_MS),
    WindowedFeature("customer_zip_codes_7d", "customer_id", "distinct_count", 7 * DAY_MS,
                    of="zip_code", include_self=True),
    WindowedFeature("customer_seconds_since_last", "customer_id", "seconds_since_last",
                    7 * DAY_MS),
    WindowedFeature("sku_orders_10m", "sku_code", "count", 10 * 60_000),
)
"""The windowed features declared so far (issue 27's examples): the orders this customer
placed in the hour before this one, the distinct delivery zips it used in the last 7 days
(this order's included), the seconds since its previous order (within 7 days), the orders of
this SKU in the 10 minutes before. A model reads them only if trained with them
(``triage train --windowed``); model_v1's four features stay the default."""


def declared(features: Sequence[WindowedFeature]) -> dict[str, WindowedFeature]:
    """name -> declaration; raises ValueError for two declarations of one name."""
    out: dict[str, WindowedFeature] = {}
    for feature in features:
        if feature.name in out:
            raise ValueError(f"windowed feature {feature.name!r} is declared twice")
        out[feature.name] = feature
    return out


# --- The stores of the feature stage (consumer/window_stage.py) ------------------------------

def stores(features: Sequence[WindowedFeature]) -> dict[str, tuple[WindowedFeature, ...]]:
    """entity -> its features, in declaration order: one store (one state, one repartition
    topic, one changelog) per entity, whatever the number of its features."""
    out: dict[str, list[WindowedFeature]] = {}
    for feature in declared(features).values():
        out.setdefault(feature.entity, []).append(feature)
    return {entity: tuple(found) for entity, found in out.items()}


def store_name(topics: TopicSettings, entity: str) -> str:
    """The store of ``entity``: ``<TRIAGE_WINDOWS_TOPIC_PREFIX>.<entity>``."""
    return f"{topics.windows_topic_prefix}.{entity}"


def repartition_topic(topics: TopicSettings, entity: str) -> str:
    """The topic the orders reach their entity's store through, keyed by the entity."""
    return f"{store_name(topics, entity)}-repartition"


def changelog_topic(topics: TopicSettings, entity: str) -> str:
    """The store's changelog: its state, one record per (order, entity value) and one of its
    watermarks, compacted; restored from on start and on rebalance."""
    return f"{store_name(topics, entity)}-changelog"


def window_topic_specs(topics: TopicSettings, features: Sequence[WindowedFeature],
                       retention_ms: int) -> dict[str, tuple[int, dict[str, str]]]:
    """Topic -> (partitions, configs) of the feature stage, for ``triage topics create``: per
    store its repartition and changelog topics, and the output topic; all with the orders
    topic's partition count (a store's partition p holds the entities the repartition
    partitioner sends to p; the output is co-partitioned with the orders, keyed by order_id).
    A changelog is ``compact,delete``; its ``retention.ms`` is wall-clock time from a key's
    last write. A store holds an order for its longest window and twice ``retention_ms``
    (TRIAGE_WINDOW_RETENTION_S) of event time past the latest order it answered, and it
    writes a tombstone when it forgets one. The changelog keeps the longest window,
    ``retention_ms`` and a day. That covers the store while event time runs about as fast as
    the clock, and the retention is at most a day. Beyond that (a slow replay, a longer
    retention), a key the store still holds can be deleted; after a restore its order then
    reads as new. A late record of it then comes out ``window_expired``, never silently
    wrong. The repartition topics use the broker's retention (7 days by default): a store's
    input is read once. The output keeps what the changelog does: every scorer reads it from
    the beginning at start (scoring/windowed.py), and keeps less."""
    specs: dict[str, tuple[int, dict[str, str]]] = {}
    for entity, found in stores(features).items():
        keep = max(f.window_ms for f in found) + retention_ms + DAY_MS
        specs[repartition_topic(topics, entity)] = (topics.orders_partitions, {})
        specs[changelog_topic(topics, entity)] = (
            topics.orders_partitions, {"cleanup.policy": "compact,delete",
                                       "retention.ms": str(keep)})
    if specs:
        keep = max(f.window_ms for f in features) + retention_ms + DAY_MS
        specs[topics.windowed_features_topic] = (topics.orders_partitions,
                                                 {"retention.ms": str(keep)})
    return specs
