"""Drift statistics: one window of drift samples against the training baseline (numpy + scipy).

Decisions, and why (the tests in ``tests/test_drift_stats.py`` measure each claim):

* **Two-sample tests.** The baseline is itself a sample (20k training rows), so every test
  compares two samples, the window's counts against the baseline's counts, instead of treating
  the baseline shares as exact. Treating them as exact inflates the statistic by ``1 + n/N``
  and raises false alarms as windows grow.
* **One check per feature, two for inventory**, each on bins fixed at training time:

  ============================  ======  ==================================================
  check                         test    bins
  ============================  ======  ==================================================
  ``order_hour_of_day``         chi2    hours, adjacent ones merged until each bin holds
                                        at least 2% of the training orders
  ``inventory_availability``    chi2    missing / out of stock (<= 0) / in stock
  ``inventory_level``           PSI     deciles of the training in-stock levels
  ``payment_status``            chi2    statuses; those under 2% merged into ``(other)``
  ``zip_code_available``        chi2    available / not available
  a windowed feature            chi2    null (always a bin of its own: unknown values) and
                                        the declared bins (model/features.py: counts 0, 1,
                                        2, 3-4, 5-9, 10+; seconds < 1 min, < 1 h, < 1 d,
                                        more); only for a model that reads it
  ``recommendation``            chi2    the model's classes (prediction drift)
  ============================  ======  ==================================================

  Inventory is a point mass (no stock, no record) plus a level. A stock-out is a different
  state, not a low level: testing the two apart keeps a rise in stock-outs in a test with 2
  degrees of freedom instead of spreading it over 11, and the level check asks whether
  in-stock levels moved.
  Sparse bins are merged because a chi-squared test with expected counts near 1 is not
  calibrated; a shift inside merged categories is only seen as a shift of the merged bin.
* **PSI with a p-value.** The population stability index is the symmetric KL divergence
  between the binned window and baseline. Under no drift, ``PSI / (1/n + 1/N)`` follows
  chi-squared with ``bins - 1`` degrees of freedom, so PSI gets a p-value and its threshold
  scales with the window instead of the fixed 0.1/0.25 rules of thumb, which miss a zip
  availability drop from 0.9 to 0.8 (PSI 0.08) at any window size.
* **Multiple testing.** Holm's step-down over the six checks (ten for a model that reads the
  four windowed features) at family level ``alpha``
  (default 0.01) bounds the chance that a window without drift raises any alarm by ``alpha``,
  whatever the dependence between checks (the prediction depends on the features). 0.01, not
  0.05: against one fixed baseline, the realised rate varies with that baseline's own sampling
  quirks (0.25% to 3.5% measured across 12 baselines at 0.01), and the target is 5%.
* **Effect floor.** An alarm also needs PSI >= 0.01: on very large windows a trivial shift
  is significant but not worth waking anyone.
* **Unseen categories.** A payment status the model does not know, or a class it does not
  have, raises an alarm in every window, however small: it is a fact, not an inference.
* **Small windows.** Below ``min_samples`` no test runs and the window reports
  ``insufficient_data`` (unseen categories still alarm).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from triage.bus.errors import ConfigurationError
from triage.model.features import FEATURES, DriftCheck, Feature, FeatureBatch

DEFAULT_ALPHA = 0.01
MIN_BIN_SHARE = 0.02
MIN_EFFECT_PSI = 0.01
MIN_BASELINE_ROWS = 20_000
LEVEL_BINS = 10
OTHER = "(other)"
OK, DRIFT, INSUFFICIENT = "ok", "drift", "insufficient_data"
AVAILABILITY_LABELS = ("missing", "out of stock", "in stock")
# Every check of a model that reads no windowed feature, in report order: each feature's declared
# checks (model.features.FEATURES), then the predictions. A model that reads windowed features
# has theirs too (Reference.from_manifest).
CHECKS = (*(check.name for f in FEATURES if f.window is None for check in f.drift),
          "recommendation")


class DriftError(ConfigurationError):
    """The model manifest has no usable drift baseline."""


def level_edges(in_stock: np.ndarray) -> np.ndarray:
    """Upper edges of the in-stock level bins: the deciles of the training levels, deduplicated
    (stock levels are integers, so deciles can coincide)."""
    if not len(in_stock):
        return np.empty(0)
    return np.unique(np.quantile(in_stock, np.arange(1, LEVEL_BINS) / LEVEL_BINS))


def level_bin_counts(edges: np.ndarray, in_stock: np.ndarray) -> np.ndarray:
    """Counts per level bin; bin ``i`` is ``(edges[i-1], edges[i]]``, the last one open."""
    return np.bincount(np.searchsorted(edges, in_stock, side="left"), minlength=len(edges) + 1)


def availability_codes(inventory: np.ndarray) -> np.ndarray:
    """0 missing, 1 out of stock (<= 0), 2 in stock: the policy's own split."""
    return np.where(np.isnan(inventory), 0, np.where(inventory <= 0, 1, 2))


# -- the reference: what each check compares a window with --------------------------------

@dataclass(frozen=True)
class CheckReference:
    """One check's bins and the baseline's counts in them."""

    name: str
    feature: str
    test: str                     # "chi2" or "psi"
    labels: tuple[str, ...]
    baseline: np.ndarray          # counts per bin, float
    counter: Callable[[FeatureBatch, np.ndarray], tuple[np.ndarray, dict[str, int]]]

    def count(self, features: FeatureBatch, recommendations: np.ndarray
              ) -> tuple[np.ndarray, dict[str, int]]:
        """(counts per bin, unseen value -> count) of a window."""
        return self.counter(features, recommendations)


def _merge_sparse_adjacent(shares: np.ndarray, min_share: float) -> list[list[int]]:
    """Consecutive indices grouped until each group holds ``min_share``; a short tail joins
    the group before it."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0.0
    for i, share in enumerate(shares):
        current.append(i)
        total += share
        if total >= min_share:
            groups.append(current)
            current, total = [], 0.0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return groups


def _categorical_counter(values_of: Callable[[FeatureBatch, np.ndarray], np.ndarray],
                         bin_of: Mapping[Any, int], n_bins: int, known: set[Any]
                         ) -> Callable[[FeatureBatch, np.ndarray], tuple[np.ndarray,
                                                                         dict[str, int]]]:
    """Counts per bin of a categorical value; values outside ``known`` are unseen and counted
    apart. Values known to the model but absent from the baseline bins go to the last bin."""

    def count(features: FeatureBatch, recommendations: np.ndarray
              ) -> tuple[np.ndarray, dict[str, int]]:
        counts = np.zeros(n_bins)
        unseen: dict[str, int] = {}
        values, numbers = np.unique(values_of(features, recommendations), return_counts=True)
        for value, number in zip(values.tolist(), numbers.tolist(), strict=True):
            if value not in known:
                unseen[str(value)] = number
            else:
                counts[bin_of.get(value, n_bins - 1)] += number
        return counts, unseen

    return count


def _categorical(name: str, feature: str, frequencies: Mapping[str, float], rows: int,
                 known: Sequence[str],
                 values_of: Callable[[FeatureBatch, np.ndarray], np.ndarray],
                 apart: Sequence[str] = ()) -> CheckReference:
    """A chi-squared check over categories. Those under MIN_BIN_SHARE of the baseline, and
    those the model knows but the baseline never had, share an ``(other)`` bin; if that bin is
    itself under MIN_BIN_SHARE, the smallest major category joins it. A category in ``apart``
    keeps a bin of its own whatever its share (a windowed feature's ``null``: unknown values
    must not pass for a shift of the known ones)."""
    major = sorted((c for c, s in frequencies.items() if s >= MIN_BIN_SHARE or c in apart),
                   key=lambda c: -frequencies.get(c, 0.0))
    major += [c for c in apart if c not in major]
    minor = sorted((set(frequencies) | set(known)) - set(major))
    joinable = [c for c in major if c not in apart]
    if minor and len(joinable) > 1 \
            and sum(frequencies.get(c, 0.0) for c in minor) < MIN_BIN_SHARE:
        smallest = min(joinable, key=lambda c: frequencies.get(c, 0.0))
        major.remove(smallest)
        minor = sorted([*minor, smallest])
    bin_of = {c: i for i, c in enumerate(major)}
    labels = [*major, *([f"{OTHER}: {', '.join(minor)}"] if minor else [])]
    baseline = np.zeros(len(labels))
    for category, share in frequencies.items():
        baseline[bin_of.get(category, len(labels) - 1)] += round(share * rows)
    counter = _categorical_counter(values_of, bin_of, len(labels),
                                   set(known) | set(frequencies))
    return CheckReference(name, feature, "chi2", tuple(labels), baseline, counter)


def _column(feature: str) -> Callable[[FeatureBatch, np.ndarray], np.ndarray]:
    return lambda features, _: features.columns[feature]


def _hour_check(check: DriftCheck, feature: str, shares: Sequence[float], rows: int
                ) -> CheckReference:
    groups = _merge_sparse_adjacent(np.asarray(shares, dtype=float), MIN_BIN_SHARE)
    labels = tuple(f"{g[0]:02d}" if len(g) == 1 else f"{g[0]:02d}-{g[-1]:02d}" for g in groups)
    bin_of = {hour: i for i, g in enumerate(groups) for hour in g}
    baseline = np.array([sum(round(shares[h] * rows) for h in g) for g in groups], dtype=float)
    counter = _categorical_counter(_column(feature), bin_of, len(groups), set(range(24)))
    return CheckReference(check.name, feature, "chi2", labels, baseline, counter)


def _availability_check(check: DriftCheck, feature: str, summary: Mapping[str, Any]
                        ) -> CheckReference:
    counts = summary["availability_counts"]
    baseline = np.array([counts[label] for label in AVAILABILITY_LABELS], dtype=float)

    def count(features: FeatureBatch, _: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        codes = availability_codes(features.columns[feature])
        return np.bincount(codes, minlength=3).astype(float), {}

    return CheckReference(check.name, feature, "chi2", AVAILABILITY_LABELS, baseline, count)


def _level_check(check: DriftCheck, feature: str, summary: Mapping[str, Any]
                 ) -> CheckReference:
    edges = np.asarray(summary["level_bins"]["edges"], dtype=float)
    baseline = np.asarray(summary["level_bins"]["counts"], dtype=float)
    bounds = [-np.inf, 0.0, *edges.tolist(), np.inf]
    labels = tuple(f"{_num(lo) if i else '0'}-{_num(hi)}" if np.isfinite(hi) else f">{_num(lo)}"
                   for i, (lo, hi) in enumerate(itertools.pairwise(bounds[1:])))

    def count(features: FeatureBatch, _: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        stock = features.columns[feature]
        return level_bin_counts(edges, stock[stock > 0]).astype(float), {}

    return CheckReference(check.name, feature, "psi", labels, baseline, count)


def _binary_check(check: DriftCheck, feature: str, rate: float, rows: int) -> CheckReference:
    yes, no = check.labels or ("true", "false")
    return _categorical(check.name, feature, {yes: rate, no: 1.0 - rate}, rows, [yes, no],
                        lambda f, _: np.where(f.columns[feature], yes, no))


def bin_labels(check: DriftCheck) -> tuple[str, ...]:
    """The labels of a ``binned`` check's bins: ``null``, then the check's own labels, one
    per bin [-inf, e0), [e0, e1) ... [ek, inf) of its edges. Raises ValueError for a check
    whose labels do not fit its edges."""
    if len(check.labels) != len(check.edges) + 1:
        raise ValueError(f"drift check {check.name}: {len(check.edges)} edges make "
                         f"{len(check.edges) + 1} bins, not {len(check.labels)}")
    return ("null", *check.labels)


def binned_values(check: DriftCheck, column: np.ndarray) -> np.ndarray:
    """Each value's bin label (object array); NaN is ``null``."""
    labels = np.array(bin_labels(check), dtype=object)
    codes = np.searchsorted(np.asarray(check.edges, dtype=float), column, side="right") + 1
    codes[np.isnan(column)] = 0
    return labels[codes]


def _binned_summary(check: DriftCheck, column: np.ndarray) -> dict[str, float]:
    values = binned_values(check, np.asarray(column, dtype=float))
    counts = Counter(values.tolist())
    return {label: counts.get(label, 0) / max(1, len(values)) for label in bin_labels(check)}


def _binned_check(check: DriftCheck, feature: str, summary: Mapping[str, float], rows: int
                  ) -> CheckReference:
    if set(summary) != set(bin_labels(check)):  # a baseline of other bins, or none
        raise KeyError(check.name)
    return _categorical(check.name, feature, summary, rows, list(bin_labels(check)),
                        lambda features, _: binned_values(check, features.columns[feature]),
                        apart=("null",))


def _frequencies(values: np.ndarray) -> dict[str, float]:
    counts = Counter(values.tolist())
    total = sum(counts.values())
    return {str(k): v / total for k, v in sorted(counts.items())}


def _level_summary(column: np.ndarray) -> dict[str, Any]:
    stock = column[~np.isnan(column)]
    in_stock = stock[stock > 0]
    edges = level_edges(in_stock)
    return {"quantiles": dict(zip(map(str, QUANTILES), np.quantile(stock, QUANTILES).tolist(),
                                  strict=True)) if len(stock) else {},
            "level_bins": {"edges": edges.tolist(),
                           "counts": level_bin_counts(edges, in_stock).tolist()}}


def _availability_summary(column: np.ndarray) -> dict[str, Any]:
    availability = np.bincount(availability_codes(column), minlength=3)
    return {"missing_rate": float(np.isnan(column).mean()),
            "availability_counts": dict(zip(AVAILABILITY_LABELS, availability.tolist(),
                                            strict=True))}


@dataclass(frozen=True)
class CheckKind:
    """One kind of drift check: how it summarises a training column for the manifest's
    baseline (JSON), and how it builds its reference from that summary. Several checks on one
    feature merge their summaries (dicts) into the feature's baseline entry."""

    summarise: Callable[[DriftCheck, np.ndarray], Any]
    reference: Callable[[DriftCheck, Feature, Any, int, Mapping[str, Any]], CheckReference]


QUANTILES = tuple(q / 10 for q in range(1, 10))
CHECK_KINDS: dict[str, CheckKind] = {
    "hours": CheckKind(
        lambda _, column: (np.bincount(column, minlength=24) / len(column)).tolist(),
        lambda check, f, summary, rows, _: _hour_check(check, f.name, summary, rows)),
    "availability": CheckKind(
        lambda _, column: _availability_summary(column),
        lambda check, f, summary, rows, _: _availability_check(check, f.name, summary)),
    "level": CheckKind(
        lambda _, column: _level_summary(column),
        lambda check, f, summary, rows, _: _level_check(check, f.name, summary)),
    "categorical": CheckKind(
        lambda _, column: _frequencies(column),
        # __UNSEEN__ is the model's reserved category, never a raw value.
        lambda check, f, summary, rows, manifest: _categorical(
            check.name, f.name, summary, rows,
            [v for v in manifest["categories"].get(f.name, summary) if not v.startswith("__")],
            _column(f.name))),
    "binary": CheckKind(
        lambda _, column: float(column.mean()),
        lambda check, f, summary, rows, _: _binary_check(check, f.name, float(summary), rows)),
    # A windowed feature: the shares of its bins, null one of them (chi-squared).
    "binned": CheckKind(
        _binned_summary,
        lambda check, f, summary, rows, _: _binned_check(check, f.name, summary, rows)),
}


def _checked(feature: Feature, windowed: Sequence[str]) -> bool:
    """The feature's checks apply: it is no windowed feature, or one the model reads."""
    return feature.window is None or feature.name in windowed


def training_baseline(features: FeatureBatch, recommendations: np.ndarray,
                      windowed: Sequence[str] = ()) -> dict[str, Any]:
    """The manifest's ``baseline``: per feature, the summaries of its drift checks (one check:
    its summary; several: their dicts merged), the row count, and the frequencies of
    ``recommendations``, the model's predictions on the training rows (the monitor compares
    live predictions with those). ``windowed``: the windowed features the model reads (the
    others have no checks)."""
    baseline: dict[str, Any] = {"rows": len(features)}
    for feature in FEATURES:
        if not _checked(feature, windowed):
            continue
        column = features.columns[feature.name]
        summaries = [CHECK_KINDS[check.kind].summarise(check, column)
                     for check in feature.drift]
        baseline[feature.name] = summaries[0] if len(summaries) == 1 else {
            key: value for summary in summaries for key, value in summary.items()}
    baseline["recommendation"] = _frequencies(recommendations)
    return baseline


def _num(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Reference:
    """Every check's reference, built once from a model manifest."""

    checks: tuple[CheckReference, ...]
    rows: int
    model_version: str

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Reference:
        """Every declared check's reference, from the manifest's ``baseline`` (a windowed
        feature's only for a model that reads it: its ``feature_order`` names it).

        Raises DriftError when the baseline lacks a check's summary (a model trained before
        that check existed: retrain)."""
        baseline = manifest.get("baseline") or {}
        rows = int(baseline.get("rows", 0))
        checks = []
        read = manifest.get("feature_order") or ()
        for feature in FEATURES:
            if not _checked(feature, read):
                continue
            for check in feature.drift:
                summary = baseline.get(feature.name)
                try:
                    checks.append(CHECK_KINDS[check.kind].reference(check, feature, summary,
                                                                    rows, manifest))
                except (KeyError, TypeError, ValueError):
                    raise DriftError(f"the model manifest has no drift baseline for the check "
                                     f"{check.name}: retrain the model with this version "
                                     "(`triage train`)") from None
        checks.append(_categorical("recommendation", "recommendation",
                                   baseline["recommendation"], rows, list(manifest["classes"]),
                                   lambda _, r: np.asarray(r, dtype=object)))
        return cls(tuple(checks), rows, str(manifest.get("version", "")))


# -- tests ------------------------------------------------------------------------------------

def chi2_two_sample(baseline: np.ndarray, window: np.ndarray) -> tuple[float, int]:
    """Pearson's chi-squared statistic of the 2 x k table (baseline, window), and its degrees
    of freedom; bins empty in both samples are dropped."""
    keep = (baseline + window) > 0
    table = np.vstack([baseline[keep], window[keep]]).astype(float)
    if table.shape[1] < 2 or table[1].sum() == 0 or table[0].sum() == 0:
        return 0.0, max(table.shape[1] - 1, 1)
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0) / table.sum()
    return float(((table - expected) ** 2 / expected).sum()), table.shape[1] - 1


def psi(baseline: np.ndarray, window: np.ndarray) -> float:
    """Population stability index, sum((w - b) * ln(w / b)) over bin shares; half a count is
    added to every bin so an empty one does not make it infinite."""
    w = (window + 0.5) / (window.sum() + 0.5 * len(window))
    b = (baseline + 0.5) / (baseline.sum() + 0.5 * len(baseline))
    return float(((w - b) * np.log(w / b)).sum())


def holm_adjusted(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values: reject where adjusted <= alpha."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class CheckResult:
    name: str
    feature: str
    test: str
    verdict: str                 # ok, drift or insufficient_data
    samples: int                 # window samples this check counted
    statistic: float             # chi2, or PSI for psi checks
    threshold: float             # the statistic's critical value at this check's Holm level
    p_value: float
    adjusted_p_value: float      # Holm; compared with alpha
    psi: float                   # effect size, for every check
    labels: tuple[str, ...]
    baseline_shares: tuple[float, ...]
    window_shares: tuple[float, ...]
    unseen: dict[str, int] = field(default_factory=dict)
    reason: str = ""


@dataclass(frozen=True)
class WindowResult:
    samples: int
    status: str                  # ok, drift or insufficient_data
    alpha: float
    min_samples: int
    checks: tuple[CheckResult, ...]

    @property
    def drifted(self) -> list[CheckResult]:
        return [c for c in self.checks if c.verdict == DRIFT]

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)


def _shares(counts: np.ndarray) -> tuple[float, ...]:
    total = counts.sum()
    return tuple((counts / total).tolist()) if total else tuple(0.0 for _ in counts)


def evaluate(reference: Reference, features: FeatureBatch, recommendations: np.ndarray, *,
             alpha: float = DEFAULT_ALPHA, min_samples: int = 500,
             min_effect: float = MIN_EFFECT_PSI) -> WindowResult:
    """Every check of one window against the baseline, corrected for testing them together."""
    n = len(features)
    counted = [ref.count(features, recommendations) for ref in reference.checks]
    tested = n >= min_samples
    raw: list[tuple[float, int, float]] = []  # statistic, df, p-value
    for ref, (counts, _) in zip(reference.checks, counted, strict=True):
        window_n, base_n = counts.sum(), ref.baseline.sum()
        if not tested or window_n == 0:
            raw.append((0.0, 1, 1.0))
            continue
        chi2, df = chi2_two_sample(ref.baseline, counts)
        if ref.test == "psi":
            scale = 1.0 / window_n + 1.0 / base_n
            value = psi(ref.baseline, counts)
            raw.append((value, df, float(stats.chi2.sf(value / scale, df))))
        else:
            raw.append((chi2, df, float(stats.chi2.sf(chi2, df))))
    in_test = [i for i, (counts, _) in enumerate(counted) if tested and counts.sum() > 0]
    adjusted = np.ones(len(raw))
    if in_test:
        adjusted[in_test] = holm_adjusted([raw[i][2] for i in in_test])
    ranks = {i: r for r, i in enumerate(sorted(in_test, key=lambda i: (raw[i][2], i)))}

    results = []
    for i, (ref, (counts, unseen)) in enumerate(zip(reference.checks, counted, strict=True)):
        statistic, df, p = raw[i]
        effect = psi(ref.baseline, counts) if counts.sum() else 0.0
        threshold = float("nan")
        if i in ranks:
            level = alpha / (len(in_test) - ranks[i])
            threshold = float(stats.chi2.isf(level, df))
            if ref.test == "psi":
                threshold *= 1.0 / counts.sum() + 1.0 / ref.baseline.sum()
        if unseen:
            verdict, reason = DRIFT, "unseen: " + ", ".join(sorted(unseen))
        elif i not in ranks:
            verdict = INSUFFICIENT
            reason = (f"{n} samples, fewer than {min_samples}" if not tested
                      else "no samples in this check")
        elif adjusted[i] <= alpha and effect >= min_effect:
            verdict, reason = DRIFT, f"{ref.test} {statistic:.4g} > {threshold:.4g}"
        else:
            verdict, reason = OK, ("significant but PSI below the effect floor"
                                   if adjusted[i] <= alpha else "")
        results.append(CheckResult(
            ref.name, ref.feature, ref.test, verdict, int(counts.sum()), float(statistic),
            threshold, float(p), float(adjusted[i]), effect, ref.labels,
            _shares(ref.baseline), _shares(counts), dict(unseen), reason))

    if any(r.verdict == DRIFT for r in results):
        status = DRIFT
    elif not tested:
        status = INSUFFICIENT
    else:
        status = OK
    return WindowResult(n, status, alpha, min_samples, tuple(results))
