"""The model features: declared once, computed for a whole batch at once.

:data:`FEATURES` is the only place a feature is defined. Each :class:`Feature` says how it is
computed (vectorised over a batch of orders, from the reference data), its numpy dtype and
missing value, its Avro type in the prediction and drift-sample contracts (a test holds the
``.avsc`` files to it), how it enters the classifier's design matrix
(:class:`~triage.model.artifact.DesignColumns`) and which drift checks watch it
(:mod:`triage.model.drift`). Training calls the same code over the history as the scorer over
each batch, so the two cannot drift apart. Adding a feature means a declaration here, its
values in the data generator and, if it decides anything, the policy.

The four features (the original exercise's; docs/how-it-works.md):

* ``order_hour_of_day``: hour 0-23 of the order timestamp, UTC.
* ``inventory``: latest stock of the SKU at or before the order; NaN when there is none.
* ``payment_status``: latest status of the order at or before it; ``MISSING`` when none.
* ``zip_code_available``: order strictly after the zip's ``available_from``; False if unknown.

Order and reference times are compared at their own precision, UTC epoch milliseconds: a CSV
row's whole second is a multiple of 1,000, so the CSVs' second-resolution as-of join is the
same join in milliseconds, and a live event at 10:00:00.400 applies to an order at
10:00:00.600 of the same second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from triage.model.reference import ReferenceTables
from triage.model.windows import WINDOWED_FEATURES, WindowedFeature


@dataclass(frozen=True)
class OrderKeys:
    """What the features of a batch of orders are computed from."""

    reference: ReferenceTables
    order_ids: Sequence[str]
    skus: Sequence[str]
    zip_codes: Sequence[str]
    times_ms: np.ndarray  # int64 UTC milliseconds since the epoch
    # Windowed feature name -> float64 values, NaN where unknown or null (scoring/windowed.py
    # online, model/windows.py's offline_values in training); a feature absent is all NaN.
    windowed: Mapping[str, np.ndarray] | None = None


def _hour(keys: OrderKeys) -> np.ndarray:
    return np.asarray(np.floor_divide(keys.times_ms, 3_600_000) % 24)


def _inventory(keys: OrderKeys) -> np.ndarray:
    return keys.reference.as_of("inventory", keys.skus, keys.times_ms)


def _payment_status(keys: OrderKeys) -> np.ndarray:
    return keys.reference.as_of("payments", keys.order_ids, keys.times_ms)


def _zip_code_available(keys: OrderKeys) -> np.ndarray:
    # Served strictly after available_from: the roll-out as of 1 ms before the order.
    return keys.reference.as_of("zip_codes", keys.zip_codes, np.asarray(keys.times_ms) - 1)


def _windowed(name: str) -> Callable[[OrderKeys], np.ndarray]:
    def compute(keys: OrderKeys) -> np.ndarray:
        found = (keys.windowed or {}).get(name)
        if found is None:
            return np.full(len(keys.times_ms), np.nan)
        return np.asarray(found, dtype=np.float64)
    return compute


# The drift bins of a windowed feature, by aggregation (model/drift.py, kind "binned"): counts
# 0, 1, 2, 3-4, 5-9, 10+; seconds since the last order under a minute, an hour, a day, more.
# Null (none in the lookback, or unknown) is a bin of its own.
_COUNT_BINS = (("0", "1", "2", "3-4", "5-9", "10+"), (1.0, 2.0, 3.0, 5.0, 10.0))
_WINDOW_BINS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "count": _COUNT_BINS, "distinct_count": _COUNT_BINS,
    "seconds_since_last": (("< 1 min", "1 min - 1 h", "1 h - 1 d", ">= 1 d"),
                           (60.0, 3600.0, 86_400.0))}


# Coverage of the windowed features a policy decides on (model/policy.py: v2's burst rule on
# customer_orders_1h); a model reading one is fitted on these values too (model/train.py).
_WINDOW_COVERAGE: dict[str, tuple[Any, ...]] = {
    "customer_orders_1h": (np.nan, 0.0, 1.0, 2.0, 3.0, 4.0, 10.0, 1000.0)}


def _as_is(values: np.ndarray) -> list[Any]:
    return values.tolist()  # type: ignore[no-any-return]


def _nan_to_null(values: np.ndarray) -> list[Any]:
    return [None if v != v else v for v in values.tolist()]


@dataclass(frozen=True)
class DriftCheck:
    """A drift check on one feature: its name (in reports and metrics), its kind (how the
    feature is binned and tested: model/drift.py ``CHECK_KINDS``), for a binary feature the
    labels of true and false, and for a ``binned`` one its bins' labels and edges."""

    name: str
    kind: str
    labels: tuple[str, ...] = ()
    # a "binned" check's bin edges: [-inf, e0), [e0, e1) ... [ek, inf), null a bin apart
    edges: tuple[float, ...] = ()


@dataclass(frozen=True)
class Feature:
    """One feature, declared once.

    ``design``: design-matrix columns built from it, by name; a column listed in
    ``trained_design`` is in the matrix of a model trained now (the others only keep older
    artifacts loadable). ``categorical``: one-hot encoded over the training vocabulary, as
    ``<name>=<value>`` columns. ``drift``: the drift checks that watch it (model/drift.py).
    ``coverage``: values that every combination of which training also fits on, so the model
    agrees with the policy off the history's grid (a categorical feature covers its whole
    vocabulary; model/train.py). ``stream``: the reference stream it is looked up in
    (model/streams.py), None for one computed from the order alone; a late event of that
    stream can change it (scoring/corrections.py).
    """

    name: str
    doc: str
    compute: Callable[[OrderKeys], np.ndarray]
    dtype: type
    avro: str | list[str]
    drift: tuple[DriftCheck, ...]
    coverage: tuple[Any, ...] = ()
    design: dict[str, Callable[[np.ndarray], np.ndarray]] = field(default_factory=dict)
    trained_design: tuple[str, ...] = ()
    categorical: bool = False
    to_avro: Callable[[np.ndarray], list[Any]] = _as_is
    missing: Any = None  # the value of a sample whose record says null (drift monitor)
    stream: str | None = None
    window: WindowedFeature | None = None


FEATURES: tuple[Feature, ...] = (
    Feature("order_hour_of_day", "hour 0-23 of the order timestamp, UTC", _hour, np.int64,
            "int", drift=(DriftCheck("order_hour_of_day", "hours"),),
            coverage=tuple(range(24)),
            design={"order_hour_of_day": lambda v: v}, trained_design=("order_hour_of_day",)),
    Feature("inventory", "latest stock of the SKU at or before the order; NaN when none",
            _inventory, np.float64, ["null", "double"],
            drift=(DriftCheck("inventory_availability", "availability"),
                   DriftCheck("inventory_level", "level")),
            # Missing, out of stock (<= 0, including oversold) and in stock, fractions (goods
            # sold by weight) and far outside any history.
            coverage=(np.nan, -1.0, 0.0, 0.001, 0.5, 1.0, 1e6),
            # in_stock (> 0; missing is 0) rather than the raw level: no tree can then split
            # the level anywhere but at the policy's 0 (model/artifact.py). The raw level
            # keeps artifacts from before in_stock loadable.
            design={"in_stock": lambda v: np.greater(v, 0), "inventory": lambda v: v},
            trained_design=("in_stock",), to_avro=_nan_to_null, missing=np.nan,
            stream="inventory"),
    Feature("payment_status", "latest status of the order at or before it; MISSING when none",
            _payment_status, object, "string", drift=(DriftCheck("payment_status",
                                                                 "categorical"),),
            categorical=True, stream="payments"),
    Feature("zip_code_available", "order strictly after the zip's available_from; false if "
            "unknown", _zip_code_available, np.bool_, "boolean",
            drift=(DriftCheck("zip_code_available", "binary", ("available", "not available")),),
            coverage=(True, False),
            design={"zip_code_available": lambda v: v}, trained_design=("zip_code_available",),
            stream="zip_codes"),
    # The windowed features (model/windows.py): float64, NaN where null. A model uses one only
    # if it was trained with it (triage train --windowed); for the others the scorer does not
    # join them (scoring/windowed.py) and the prediction holds null.
    *(Feature(w.name, f"{w.aggregation} of the {w.entity}'s orders in {w.window_ms} ms before "
              "the order (model/windows.py)", _windowed(w.name), np.float64,
              ["null", "double"],
              drift=(DriftCheck(w.name, "binned", *_WINDOW_BINS[w.aggregation]),),
              coverage=_WINDOW_COVERAGE.get(w.name, (np.nan,)),
              design={w.name: lambda v: v}, to_avro=_nan_to_null, missing=np.nan,
              stream="windowed_features", window=w)
      for w in WINDOWED_FEATURES),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
BY_NAME: dict[str, Feature] = {f.name: f for f in FEATURES}
WINDOWED_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.window is not None)


class FeatureBatch:
    """The features of a batch of orders: one numpy column per declared feature, in
    :data:`FEATURES` order, all of one length. Columns are attributes
    (``batch.inventory``); construct positionally in declaration order or by name. The
    windowed features may be left out: they are then NaN (null, not joined)."""

    __slots__ = ("columns",)

    def __init__(self, *values: np.ndarray, **named: np.ndarray) -> None:
        columns = dict(zip(FEATURE_NAMES, values, strict=False))
        columns.update(named)
        if WINDOWED_NAMES and not set(WINDOWED_NAMES) <= set(columns) and columns:
            size = len(next(iter(columns.values())))
            for name in WINDOWED_NAMES:
                columns.setdefault(name, np.full(size, np.nan))
        if set(columns) != set(FEATURE_NAMES) or len(values) > len(FEATURE_NAMES):
            raise TypeError(f"FeatureBatch needs exactly {', '.join(FEATURE_NAMES)}; "
                            f"got {', '.join(columns)}")
        self.columns: dict[str, np.ndarray] = {name: columns[name] for name in FEATURE_NAMES}
        lengths = {len(c) for c in self.columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"feature columns of different lengths: {sorted(lengths)}")

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.columns[name]
        except KeyError:
            raise AttributeError(name) from None

    def __len__(self) -> int:
        return len(self.columns[FEATURE_NAMES[0]])

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return iter(self.columns.items())

    def take(self, rows: np.ndarray | slice) -> FeatureBatch:
        """The batch restricted to ``rows`` (an index array, mask or slice)."""
        return FeatureBatch(**{name: column[rows] for name, column in self.columns.items()})

    def records(self) -> list[dict[str, Any]]:
        """One ``Features`` Avro record per order (prediction.avsc, drift_sample.avsc): the
        declared features by name, missing values as null."""
        values = list(self.avro_columns().values())
        return [dict(zip(FEATURE_NAMES, row, strict=True)) for row in zip(*values, strict=True)]

    def avro_columns(self) -> dict[str, list[Any]]:
        """The ``Features`` Avro records as columns: feature name -> one plain value per order
        (missing values as None), in the declared order."""
        return {name: BY_NAME[name].to_avro(column) for name, column in self.columns.items()}

    @classmethod
    def from_values(cls, columns: Mapping[str, Sequence[Any]]) -> FeatureBatch:
        """Columns of plain values, as Avro feature records hold them (a None is the
        feature's missing value), as arrays of the declared dtypes."""
        return cls(**{f.name: np.array([f.missing if v is None else v for v in columns[f.name]],
                                       dtype=f.dtype)
                      for f in FEATURES if f.name in columns or f.window is None})


def compute_features(reference: ReferenceTables, order_ids: Sequence[str], skus: Sequence[str],
                     zip_codes: Sequence[str], timestamps_ms: np.ndarray,
                     windowed: Mapping[str, np.ndarray] | None = None) -> FeatureBatch:
    """Every declared feature of a batch of orders (timestamps in UTC epoch milliseconds);
    ``windowed``: the windowed features' values (name -> float64, NaN for null), NaN for
    those not given."""
    keys = OrderKeys(reference, order_ids, skus, zip_codes,
                     np.asarray(timestamps_ms, dtype=np.int64), windowed)
    return FeatureBatch(**{f.name: f.compute(keys) for f in FEATURES})
