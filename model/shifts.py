"""Shifted versions of the generated data, to measure the drift monitor against (issue 5).

``generate(n, seed, out, shift=NAME)`` draws the unshifted data exactly as without ``shift``
and then changes it here, with a random generator of its own. So a shifted data set is the
*same store* (catalogue, popularity, stock cycles, zip roll-out, customers, payment habits) with
one thing changed, which is what a drift test must tell apart. A different seed is a different
store: its inventory and zip availability differ from another seed's by more than a window of
1,000 samples can hide, which is why the monitor is compared with the training data of the
same store and never across seeds.

The scenarios (rates as of the order, on the default data):

* ``night-orders``: 20% of orders move into 00:00-04:59 of their day; their payment events move
  with them, so only the hour changes (and with it the ``Decline`` share).
* ``stockouts``: a supplier failure: SKUs that take about 10% of orders (never one of the 30
  most popular, so no single SKU decides the rate) are out of stock all period. Out of stock
  as of the order goes from about 6% to about 15%. (The issue leaves the size open; a rise
  half as large is measured in docs/operating.md, "Drift monitoring".)
* ``payment-failures``: about 5% more orders find a failed status (``DECLINED``,
  ``INSUFFICIENT_FUNDS``, ``FRAUD_REVIEW``) where they had ``OK``: not OK goes from about 5.5%
  to about 10.5%.
* ``zip-rollback``: zip codes served before the period, taking about 10% of orders, are
  withdrawn until its end: availability goes from about 0.9 to about 0.8.
* ``new-payment-status``: about 2% of orders show ``AWAITING_3DS`` (a 3-D Secure challenge, a
  status training never saw) where they had ``OK``.
* ``customer-bursts``: behaviour over time (issue 27): about 3% of orders come in bursts of 5,
  each burst a random order and the 4 orders of the store after it, all given to the first
  one's customer: one customer ordering to 5 zips in quick succession (minutes at the default
  density of 20,000 orders in 4 weeks; longer for sparser data). The orders keep their zips,
  times and payments. Policy v2 declines a customer's fourth order within an hour and later ones
  (model/policy.py).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np

from triage.bus.errors import ConfigurationError
from triage.model.scenarios import SCENARIOS

DAY = 86_400
NIGHT_SHARE = 0.20
NIGHT_HOURS = 5  # 00:00-04:59
STOCKOUT_ORDER_SHARE = 0.10
STOCKOUT_MIN_RANK = 30
PAYMENT_FAILURE_SHARE = 0.053  # of all orders; ~94% of them had OK, so ~+5 points not OK
FAILED_STATUSES = ("DECLINED", "INSUFFICIENT_FUNDS", "FRAUD_REVIEW")
FAILED_WEIGHTS = (0.4, 0.35, 0.25)
ZIP_ROLLBACK_ORDER_SHARE = 0.10
NEW_STATUS = "AWAITING_3DS"
NEW_STATUS_SHARE = 0.02
BURST_ORDER_SHARE = 0.03
BURST_SIZE = 5


@dataclass(frozen=True)
class RawData:
    """What ``generate`` writes, before formatting: times in epoch seconds, catalogue indices."""

    order_ts: np.ndarray       # sorted
    order_sku: np.ndarray      # index into the SKU catalogue; >= len(sku_share) is unknown
    order_zip: np.ndarray      # index into the zip catalogue; >= len(zip_share) is unknown
    order_ids: np.ndarray
    customer_ids: np.ndarray
    payments: tuple[np.ndarray, np.ndarray, np.ndarray]   # (order index, seconds, status)
    inventory: tuple[np.ndarray, np.ndarray, np.ndarray]  # (sku index, seconds, level)
    zip_available_from: np.ndarray
    period_start: int
    period_end: int
    sku_share: np.ndarray
    zip_share: np.ndarray


def apply_shift(name: str, seed: int, data: RawData) -> RawData:
    """``data`` changed as scenario ``name`` says; deterministic in (name, seed)."""
    if name not in SCENARIOS:
        raise ConfigurationError(f"unknown shift {name!r}; choose from {', '.join(SCENARIOS)}")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return _SHIFTS[name](rng, data)


def _night_orders(rng: np.random.Generator, data: RawData) -> RawData:
    ts = data.order_ts
    n = len(ts)
    moved = rng.choice(n, size=round(NIGHT_SHARE * n), replace=False)
    new_ts = ts.copy()
    new_ts[moved] = ts[moved] - ts[moved] % DAY + rng.integers(0, NIGHT_HOURS * 3600,
                                                                size=len(moved))
    span = data.period_end - data.period_start
    new_ts[new_ts < data.period_start] += span  # as generate() wraps times before `start`
    delta = new_ts - ts

    pay_idx, pay_ts, status = data.payments
    pay_ts = pay_ts + delta[pay_idx]  # a payment happens around its order: it moves along
    order = np.argsort(new_ts, kind="stable")
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    pay_idx = position[pay_idx]
    pay_order = np.lexsort((np.arange(len(pay_idx)), pay_idx, pay_ts))
    return replace(
        data, order_ts=new_ts[order], order_sku=data.order_sku[order],
        order_zip=data.order_zip[order], order_ids=data.order_ids[order],
        customer_ids=data.customer_ids[order],
        payments=(pay_idx[pay_order], pay_ts[pay_order], status[pay_order]))


def _stockouts(rng: np.random.Generator, data: RawData) -> RawData:
    share = data.sku_share
    rank = np.empty(len(share), dtype=np.int64)
    rank[np.argsort(-share, kind="stable")] = np.arange(len(share))
    failed = _take_share(rng, np.flatnonzero(rank >= STOCKOUT_MIN_RANK), share,
                         STOCKOUT_ORDER_SHARE)
    sku, ts, level = data.inventory
    out = np.isin(sku, failed)
    level = level.copy()
    level[out] = np.where(rng.random(int(out.sum())) < 0.6, 0,
                          -rng.integers(1, 6, size=int(out.sum())))
    return replace(data, inventory=(sku, ts, level))


def _replace_ok_status(rng: np.random.Generator, data: RawData, share: float,
                       statuses: tuple[str, ...], weights: tuple[float, ...]) -> RawData:
    """For a random ``share`` of orders, every ``OK`` event at or before the order becomes one
    of ``statuses``; events after the order stay as they were."""
    n = len(data.order_ts)
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.choice(n, size=round(share * n), replace=False)] = True
    pay_idx, pay_ts, status = data.payments
    status = status.astype(object)
    hit = chosen[pay_idx] & (pay_ts <= data.order_ts[pay_idx]) & (status == "OK")
    status[hit] = rng.choice(np.array(statuses, dtype=object), size=int(hit.sum()), p=weights)
    return replace(data, payments=(pay_idx, pay_ts, status))


def _payment_failures(rng: np.random.Generator, data: RawData) -> RawData:
    return _replace_ok_status(rng, data, PAYMENT_FAILURE_SHARE, FAILED_STATUSES, FAILED_WEIGHTS)


def _new_payment_status(rng: np.random.Generator, data: RawData) -> RawData:
    return _replace_ok_status(rng, data, NEW_STATUS_SHARE, (NEW_STATUS,), (1.0,))


def _zip_rollback(rng: np.random.Generator, data: RawData) -> RawData:
    available = data.zip_available_from.copy()
    served = np.flatnonzero(available < data.period_start)  # withdrawn for the whole period
    withdrawn = _take_share(rng, served, data.zip_share, ZIP_ROLLBACK_ORDER_SHARE)
    available[withdrawn] = data.period_end
    return replace(data, zip_available_from=available)


def _customer_bursts(rng: np.random.Generator, data: RawData) -> RawData:
    n = len(data.order_ts)
    customers = data.customer_ids.copy()
    starts = np.sort(rng.choice(max(1, n - BURST_SIZE), size=round(BURST_ORDER_SHARE * n
                                                                  / BURST_SIZE),
                                replace=False))
    taken = np.zeros(n, dtype=bool)
    for start in starts.tolist():  # a burst never overlaps another
        burst = np.arange(start, min(n, start + BURST_SIZE))
        if taken[burst].any():
            continue
        taken[burst] = True
        customers[burst] = customers[start]
    return replace(data, customer_ids=customers)


def _take_share(rng: np.random.Generator, candidates: np.ndarray, share: np.ndarray,
                target: float) -> np.ndarray:
    """Candidates in random order, as few as make up ``target`` of the expected orders."""
    shuffled = rng.permutation(candidates)
    count = int(np.searchsorted(np.cumsum(share[shuffled]), target)) + 1
    return shuffled[:count]


_SHIFTS = {
    "night-orders": _night_orders,
    "stockouts": _stockouts,
    "payment-failures": _payment_failures,
    "zip-rollback": _zip_rollback,
    "new-payment-status": _new_payment_status,
    "customer-bursts": _customer_bursts,
}
