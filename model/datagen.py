"""Synthetic order history in the CSV formats users already have (the original exercise's
files; docs/contracts.md, "Bad input", says how they are read).

The data is shaped so that training and the streaming scorer are tested against what real
histories look like, not against a tidy toy:

* 3,000 SKUs with Zipf-like popularity; stock levels follow a sawtooth (sold down, restocked)
  and run out in episodes, sometimes oversold below zero. Most histories start before the first
  order, a few SKUs start stocking only mid-period, and ~1% of orders name a SKU that has no
  inventory history at all.
* ~1,000 zip codes, most served before the first order and some rolled out during the period;
  ~1% of orders go to a zip code that is not in the table.
* payment status histories (``PENDING`` then ``OK``, retries after ``DECLINED`` or
  ``INSUFFICIENT_FUNDS``, ``FRAUD_REVIEW``, events that arrive after the order, no record at all).
* a daily cycle with few orders at night.
* exact timestamp ties on purpose (payment events, inventory rows and zip roll-outs at an order's
  very second; two inventory rows of one SKU in the same second), because an as-of join that is
  off by one at a tie must fail the comparison with ``pandas.merge_asof``.

The rates are tuned so that every class of the reference policy is well represented as of the
order timestamp: inventory missing or <= 0 ~8%, zip not available ~10%, payment not ``OK``
~5%, hour < 6 ~8%.

Everything is drawn from one ``numpy.random.Generator`` in a fixed order and vectorised over
rows, so the same arguments give byte-identical files and 100k orders take about a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from triage.bus.errors import ConfigurationError

CSV_FILES = ("orders.csv", "payments.csv", "inventory.csv", "zip_codes.csv")

DAY = 86_400
WEEK = 7 * DAY

N_SKUS = 3_000
N_UNKNOWN_SKUS = 30
SKU_ZIPF_EXPONENT = 1.0
N_ZIPS = 1_000
N_UNKNOWN_ZIPS = 20
UNKNOWN_SKU_RATE = 0.01
UNKNOWN_ZIP_RATE = 0.01

# Share of SKUs that start stocking only mid-period; never among the most popular ones, so one
# unlucky draw cannot move the overall rate by much.
LATE_SKU_RATE = 0.06
LATE_SKU_MIN_RANK = 30
# Expected share of (post-start) time a SKU spends out of stock.
OUT_OF_STOCK_TIME = 0.05
# Share of orders that anchor a tie: a stock-out starting, a restock ending, or a plain stock
# count, at exactly the order's second; a third of the plain counts get a same-second correction.
ANCHORED_STOCKOUT_RATE = 0.005
ANCHORED_RESTOCK_RATE = 0.005
ANCHORED_COUNT_RATE = 0.015
ANCHORED_EPISODE_SECONDS = 600

ZIP_ROLLOUT_RATE = 0.18
ZIP_TIE_RATE = 0.3

# Orders per hour of day (UTC): 8% between 00:00 and 05:59, peaks at lunch and in the evening.
_NIGHT_SHARE = 0.08
_NIGHT_WEIGHTS = np.array([2.2, 1.6, 1.2, 1.0, 0.9, 1.1])
_DAY_WEIGHTS = np.array(
    [1.8, 3.0, 4.5, 5.5, 6.0, 6.5, 7.0, 6.8, 6.0, 5.5, 5.2, 5.0, 5.5, 6.2, 6.6, 6.0, 4.4, 3.0]
)
HOUR_PROBS = np.concatenate(
    [
        _NIGHT_SHARE * _NIGHT_WEIGHTS / _NIGHT_WEIGHTS.sum(),
        (1 - _NIGHT_SHARE) * _DAY_WEIGHTS / _DAY_WEIGHTS.sum(),
    ]
)

# Payment histories: (probability, ((status, slot), ...)). Slots, relative to the order second:
# "early" 30 s to 30 min before; "before" after "early" and at or before the order; "at" the
# order's second; "after" 1 s to 1 h after; "later" after "after". The first scenario takes the
# remaining probability. Not OK as of the order: ~2.5% + 3% without any record.
_PAYMENT_SCENARIOS: tuple[tuple[float, tuple[tuple[str, str], ...]], ...] = (
    (0.0, (("OK", "early"),)),
    (0.08, (("OK", "at"),)),
    (0.12, (("PENDING", "early"), ("OK", "before"))),
    (0.03, (("DECLINED", "early"), ("OK", "before"))),
    (0.02, (("FRAUD_REVIEW", "early"), ("OK", "before"))),
    (0.02, (("INSUFFICIENT_FUNDS", "early"), ("OK", "before"))),
    (0.01, (("OK", "early"), ("FRAUD_REVIEW", "after"), ("OK", "later"))),
    (0.005, (("PENDING", "at"), ("OK", "after"))),
    (0.004, (("PENDING", "early"), ("OK", "after"))),
    (0.004, (("DECLINED", "early"),)),
    (0.003, (("FRAUD_REVIEW", "early"), ("OK", "after"))),
    (0.002, (("FRAUD_REVIEW", "before"), ("DECLINED", "after"))),
    (0.003, (("INSUFFICIENT_FUNDS", "early"), ("OK", "later"))),
    (0.005, (("OK", "after"),)),
    (0.03, ()),
)


@dataclass(frozen=True)
class _Period:
    """The generated period in epoch seconds: orders fall in ``[start, end)``."""

    start: int
    end: int

    @property
    def span(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class _Orders:
    """Orders sorted by time; ``sku``/``zip`` index the catalogs (unknown codes come last)."""

    ts: np.ndarray
    sku: np.ndarray
    zip: np.ndarray
    customer: np.ndarray


def generate(
    n_orders: int,
    seed: int,
    out_dir: str | Path,
    *,
    weeks: int = 4,
    start: str = "2026-01-05 00:00:00",
    shift: str | None = None,
) -> dict[str, Path]:
    """Write orders.csv, payments.csv, inventory.csv, zip_codes.csv into out_dir (created if
    needed); return name -> path. ``shift`` names a scenario of ``model.shifts``: the same data,
    changed only as the scenario says."""
    if n_orders < 1:
        raise ConfigurationError(f"n_orders must be >= 1, got {n_orders}")
    if weeks < 1:
        raise ConfigurationError(f"weeks must be >= 1, got {weeks}")
    rng = np.random.default_rng(seed)
    t0 = _epoch_seconds(start)
    period = _Period(t0, t0 + weeks * WEEK)

    sku_codes = _codes(rng, N_SKUS, N_UNKNOWN_SKUS, "SKU-", 5)
    zip_codes = _codes(rng, N_ZIPS, N_UNKNOWN_ZIPS, "", 5, low=501)
    sku_share = _zipf_shares(rng, N_SKUS)
    zip_share = rng.gamma(2.0, size=N_ZIPS)
    zip_share /= zip_share.sum()

    orders = _draw_orders(rng, n_orders, period, sku_share, zip_share)
    inventory = _inventory(rng, period, sku_share, orders)
    available_from = _zip_rollout(rng, period, orders)
    payments = _payments(rng, orders)
    order_ids = _order_ids(rng, n_orders)
    customer_ids = _customer_ids(rng, orders.customer, max(1, n_orders // 3))
    if shift is not None:
        from triage.model.shifts import RawData, apply_shift

        raw = apply_shift(shift, seed, RawData(
            orders.ts, orders.sku, orders.zip, order_ids, customer_ids, payments, inventory,
            available_from, period.start, period.end, sku_share, zip_share))
        orders = _Orders(ts=raw.order_ts, sku=raw.order_sku, zip=raw.order_zip,
                         customer=np.empty(0, dtype=np.int64))  # customer_ids carry them now
        order_ids, customer_ids = raw.order_ids, raw.customer_ids
        payments, inventory, available_from = raw.payments, raw.inventory, raw.zip_available_from

    frames = {
        "orders.csv": pd.DataFrame(
            {
                "order_id": order_ids,
                "customer_id": customer_ids,
                "timestamp": _format_ts(orders.ts),
                "sku_code": sku_codes[orders.sku],
                "zip_code": zip_codes[orders.zip],
            }
        ),
        "payments.csv": pd.DataFrame(
            {
                "order_id": order_ids[payments[0]],
                "timestamp": _format_ts(payments[1]),
                "payment_status": payments[2],
            }
        ),
        "inventory.csv": pd.DataFrame(
            {
                "sku_code": sku_codes[inventory[0]],
                "timestamp": _format_ts(inventory[1]),
                "inventory": inventory[2],
            }
        ),
        "zip_codes.csv": pd.DataFrame(
            {"zip_code": zip_codes[:N_ZIPS], "available_from": _format_ts(available_from)}
        ),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in CSV_FILES:
        paths[name] = out / name
        frames[name].to_csv(paths[name], index=False, lineterminator="\n")
    return paths


def _epoch_seconds(start: str) -> int:
    """Parse ``start`` as UTC (naive means UTC) into whole epoch seconds."""
    ts = pd.Timestamp(start)
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return int((ts - pd.Timestamp("1970-01-01")) // pd.Timedelta(seconds=1))


def _format_ts(seconds: np.ndarray) -> np.ndarray:
    """Epoch seconds -> ``YYYY-MM-DD HH:MM:SS`` strings, in C rather than per-row strftime."""
    iso = np.asarray(seconds, dtype=np.int64).astype("datetime64[s]").astype(str)
    return np.strings.replace(iso, "T", " ")


def _codes(
    rng: np.random.Generator, n_known: int, n_unknown: int, prefix: str, width: int, low: int = 0
) -> np.ndarray:
    """Distinct random codes: ``n_known`` sorted (code order equals index order), then
    ``n_unknown`` that only orders will name."""
    numbers = rng.choice(10**width - low, size=n_known + n_unknown, replace=False) + low
    numbers = np.concatenate([np.sort(numbers[:n_known]), np.sort(numbers[n_known:])])
    digits = np.strings.zfill(numbers.astype(str), width)
    return np.strings.add(prefix, digits) if prefix else digits


def _zipf_shares(rng: np.random.Generator, n: int) -> np.ndarray:
    """Order shares falling as 1/rank**s, with ranks shuffled so popularity is not code order."""
    weights = 1.0 / np.arange(1, n + 1) ** SKU_ZIPF_EXPONENT
    shares = np.empty(n)
    shares[rng.permutation(n)] = weights / weights.sum()
    return shares


def _draw_orders(
    rng: np.random.Generator,
    n: int,
    period: _Period,
    sku_share: np.ndarray,
    zip_share: np.ndarray,
) -> _Orders:
    """Order times with a daily cycle, customers, SKUs and zip codes, sorted by time."""
    days = rng.integers(0, period.span // DAY, size=n)
    hours = rng.choice(24, size=n, p=HOUR_PROBS)
    # Count days from midnight UTC so the cycle follows the clock even when `start` is not at
    # midnight; times before `start` wrap to the end (the span is whole days, hours are kept).
    midnight = period.start - period.start % DAY
    ts = midnight + days * DAY + hours * 3600 + rng.integers(0, 3600, size=n)
    ts[ts < period.start] += period.span
    ts.sort(kind="stable")

    sku = rng.choice(N_SKUS, size=n, p=sku_share)
    unknown_sku = rng.random(n) < UNKNOWN_SKU_RATE
    sku[unknown_sku] = N_SKUS + rng.integers(0, N_UNKNOWN_SKUS, size=int(unknown_sku.sum()))

    zips = rng.choice(N_ZIPS, size=n, p=zip_share)
    unknown_zip = rng.random(n) < UNKNOWN_ZIP_RATE
    zips[unknown_zip] = N_ZIPS + rng.integers(0, N_UNKNOWN_ZIPS, size=int(unknown_zip.sum()))

    # About n/3 customers, some much more active than others: repeat customers are the norm.
    n_customers = max(1, n // 3)
    activity = rng.gamma(0.7, size=n_customers)
    customer = rng.choice(n_customers, size=n, p=activity / activity.sum())
    return _Orders(ts=ts, sku=sku, zip=zips, customer=customer)


def _order_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """``O-<9-digit sequence>-<4 hex>``: sequence in time order, so ids sort like the file."""
    seq = np.strings.zfill(np.arange(1, n + 1).astype(str), 9)
    nibbles = rng.integers(0, 16, size=(4, n))
    hexdigits = np.array(list("0123456789abcdef"))
    suffix = hexdigits[nibbles[0]]
    for row in nibbles[1:]:
        suffix = np.strings.add(suffix, hexdigits[row])
    return np.strings.add(np.strings.add(np.strings.add("O-", seq), "-"), suffix)


def _customer_ids(rng: np.random.Generator, customer: np.ndarray, n_customers: int) -> np.ndarray:
    """``C-<digits>`` from distinct random numbers, at least six digits wide."""
    width = max(6, len(str(10 * n_customers - 1)))
    numbers = rng.choice(10**width, size=n_customers, replace=False)
    digits = np.strings.zfill(numbers.astype(str), width)
    return np.asarray(np.strings.add("C-", digits)[customer])


def _group_starts(counts: np.ndarray) -> np.ndarray:
    """Index of each group's first row when groups of ``counts`` rows are laid out in order."""
    return np.asarray(np.cumsum(counts) - counts)


def _inventory(
    rng: np.random.Generator, period: _Period, sku_share: np.ndarray, orders: _Orders
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stock level history per known SKU as (sku index, epoch seconds, level), in file order.

    Levels are periodic counts on a sawtooth (sold down, restocked). Out-of-stock episodes
    (level <= 0) are intervals: every row inside one reads <= 0, and the row ending it is a
    restock. Some episodes start or end at exactly an order's second, some plain counts land on
    an order's second, and some counts get a second, different row in the same second (a
    correction that, like in ``merge_asof``, wins because it comes later in the file).
    """
    n_sku = N_SKUS
    # When each history starts: before the period for most, mid-period for a few (never the
    # most popular ones).
    first = period.start - rng.integers(3600, 30 * DAY, size=n_sku)
    rank = np.empty(n_sku, dtype=np.int64)
    rank[np.argsort(-sku_share, kind="stable")] = np.arange(n_sku)
    late = (rng.random(n_sku) < LATE_SKU_RATE / (1 - LATE_SKU_MIN_RANK / n_sku)) & (
        rank >= LATE_SKU_MIN_RANK
    )
    first[late] = period.start + rng.integers(
        period.span // 10, 9 * period.span // 10, size=int(late.sum())
    )
    length = period.end - first

    # Sawtooth parameters: capacity, restock cycle and phase per SKU.
    capacity = rng.integers(20, 400, size=n_sku)
    cycle = rng.integers(2 * DAY, 10 * DAY, size=n_sku)
    phase = rng.integers(0, 10 * DAY, size=n_sku)

    def sawtooth(sku: np.ndarray, ts: np.ndarray) -> np.ndarray:
        remaining = 1.0 - ((ts - phase[sku]) % cycle[sku]) / cycle[sku]
        noise = rng.uniform(0.8, 1.0, size=len(sku))
        return np.asarray(1 + np.floor(capacity[sku] * remaining * noise).astype(np.int64))

    # Periodic counts: about daily at least, more often for SKUs that sell more.
    orders_per_day = len(orders.ts) * sku_share / (period.span / DAY)
    per_day = 1.0 + 0.3 * orders_per_day
    counts = 1 + rng.poisson(per_day * length / DAY)
    count_sku = np.repeat(np.arange(n_sku), counts)
    count_ts = first[count_sku] + (rng.random(len(count_sku)) * length[count_sku]).astype(np.int64)
    count_ts[_group_starts(counts)] = first  # the history starts exactly at `first`

    # Out-of-stock episodes: more and shorter ones for popular SKUs, so each SKU spends about
    # OUT_OF_STOCK_TIME of its time out of stock and the overall rate does not hinge on a few.
    episode_rate = 1.5 + 150.0 * sku_share
    mean_duration = OUT_OF_STOCK_TIME * period.span / episode_rate
    n_episodes = rng.poisson(episode_rate * length / period.span)
    ep_sku = np.repeat(np.arange(n_sku), n_episodes)
    ep_start = first[ep_sku] + (rng.random(len(ep_sku)) * length[ep_sku]).astype(np.int64)
    ep_length = 60 + rng.exponential(mean_duration[ep_sku]).astype(np.int64)
    ep_end = ep_start + ep_length

    # Ties with orders: only orders of known SKUs placed after the SKU's history started.
    eligible = np.flatnonzero(orders.sku < n_sku)
    eligible = eligible[orders.ts[eligible] > first[orders.sku[eligible]]]
    n = len(orders.ts)
    k_out = round(ANCHORED_STOCKOUT_RATE * n)
    k_in = round(ANCHORED_RESTOCK_RATE * n)
    k_count = round(ANCHORED_COUNT_RATE * n)
    picks = rng.permutation(eligible)[: k_out + k_in + k_count]
    out_at, in_at, count_at = np.split(picks, [k_out, k_out + k_in])
    out_sku, in_sku = orders.sku[out_at], orders.sku[in_at]
    # Anchored episodes are brief, so the out-of-stock rate does not grow with n_orders.
    out_len = 60 + rng.exponential(ANCHORED_EPISODE_SECONDS, size=len(out_at)).astype(np.int64)
    in_len = 60 + rng.exponential(ANCHORED_EPISODE_SECONDS, size=len(in_at)).astype(np.int64)
    in_start = np.maximum(orders.ts[in_at] - in_len, first[in_sku])
    ep_sku = np.concatenate([ep_sku, out_sku, in_sku])
    ep_start = np.concatenate([ep_start, orders.ts[out_at], in_start])
    ep_end = np.concatenate([ep_end, orders.ts[out_at] + out_len, orders.ts[in_at]])
    keep_end = ep_end < period.end

    count_sku = np.concatenate([count_sku, orders.sku[count_at]])
    count_ts = np.concatenate([count_ts, orders.ts[count_at]])

    # All rows, then the state at each row: inside an episode (depth > 0) the level is <= 0.
    sku = np.concatenate([count_sku, ep_sku, ep_sku[keep_end]])
    ts = np.concatenate([count_ts, ep_start, ep_end[keep_end]])
    delta = np.concatenate(
        [np.zeros(len(count_sku), np.int64), np.ones(len(ep_sku), np.int64),
         -np.ones(int(keep_end.sum()), np.int64)]
    )
    order = np.lexsort((np.arange(len(sku)), ts, sku))
    sku, ts, delta = sku[order], ts[order], delta[order]
    depth = np.cumsum(delta)
    group_start = np.searchsorted(sku, sku)
    depth -= (depth - delta)[group_start]
    level = sawtooth(sku, ts)
    restock = (delta < 0) & (depth == 0)
    level[restock] = capacity[sku[restock]]
    out = depth > 0
    level[out] = _short_levels(rng, int(out.sum()))

    # Same-second corrections: a third of the counts placed at an order's second get a second row
    # with a different level right after the first one.
    n_counts = len(count_sku)
    tied_count = (order >= n_counts - len(count_at)) & (order < n_counts)
    fix = np.flatnonzero(tied_count)[rng.random(int(tied_count.sum())) < 1 / 3]
    fix_level = np.where(
        level[fix] > 0,
        np.where(rng.random(len(fix)) < 0.5, _short_levels(rng, len(fix)),
                 level[fix] + rng.integers(1, 50, size=len(fix))),
        capacity[sku[fix]],
    )
    sku = np.concatenate([sku, sku[fix]])
    ts = np.concatenate([ts, ts[fix]])
    level = np.concatenate([level, fix_level])
    # File order: by second, then SKU; a correction directly follows the row it corrects.
    position = np.concatenate([np.arange(len(order)), fix])
    tiebreak = np.concatenate([np.zeros(len(order), np.int64), np.ones(len(fix), np.int64)])
    final = np.lexsort((tiebreak, position, sku, ts))
    return sku[final], ts[final], level[final]


def _short_levels(rng: np.random.Generator, n: int) -> np.ndarray:
    """Out-of-stock levels: mostly 0, sometimes oversold (negative)."""
    return np.where(rng.random(n) < 0.6, 0, -rng.integers(1, 6, size=n))


def _zip_rollout(rng: np.random.Generator, period: _Period, orders: _Orders) -> np.ndarray:
    """``available_from`` per known zip: most long before the period, some rolled out during it,
    a share of those exactly at the second of one of their orders (not yet available to it)."""
    available = period.start - rng.integers(DAY, 730 * DAY, size=N_ZIPS)
    rollout = rng.random(N_ZIPS) < ZIP_ROLLOUT_RATE
    available[rollout] = period.start + rng.integers(
        period.span // 30, 29 * period.span // 30, size=int(rollout.sum())
    )
    known = np.flatnonzero(orders.zip < N_ZIPS)
    candidates = known[rollout[orders.zip[known]]]
    shuffled = rng.permutation(candidates)
    zips, first = np.unique(orders.zip[shuffled], return_index=True)
    tie = rng.random(len(zips)) < ZIP_TIE_RATE
    available[zips[tie]] = orders.ts[shuffled[first[tie]]]
    return available


def _payments(
    rng: np.random.Generator, orders: _Orders
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Payment status events as (order index, epoch seconds, status), in file order."""
    n = len(orders.ts)
    probs = np.array([p for p, _ in _PAYMENT_SCENARIOS])
    probs[0] = 1.0 - probs[1:].sum()
    scenario = rng.choice(len(_PAYMENT_SCENARIOS), size=n, p=probs)

    ts = orders.ts
    early = ts - rng.integers(30, 1800, size=n)
    before = early + 1 + (rng.random(n) * (ts - early)).astype(np.int64)  # in (early, ts]
    after = ts + rng.integers(1, 3600, size=n)
    slots = {
        "early": early,
        "before": before,
        "at": ts,
        "after": after,
        "later": after + rng.integers(1, 3600, size=n),
    }

    idx_parts: list[np.ndarray] = []
    ts_parts: list[np.ndarray] = []
    status_parts: list[np.ndarray] = []
    step_parts: list[np.ndarray] = []
    for s, (_, steps) in enumerate(_PAYMENT_SCENARIOS):
        members = np.flatnonzero(scenario == s)
        for number, (name, slot) in enumerate(steps):
            idx_parts.append(members)
            ts_parts.append(slots[slot][members])
            status_parts.append(np.full(len(members), name))
            step_parts.append(np.full(len(members), number))
    idx = np.concatenate(idx_parts)
    when = np.concatenate(ts_parts)
    statuses = np.concatenate(status_parts)
    order = np.lexsort((np.concatenate(step_parts), idx, when))
    return idx[order], when[order], statuses[order]
