"""``triage drift report``: one self-contained HTML page from the drift reports topic.

For every check (each feature, inventory twice, and the predictions) the page shows the
baseline and the latest window's distributions side by side, the statistic against its
threshold and the verdict, and the statistic's trend over the last K windows, against the
windows' times. It states what the reports saw, not this command's settings: each window's
samples, the event-time span of its orders and the rate(s) its samples were taken at (each
sample carries its sampler's rate). An alarm a zip roll-out causes by design is explained where
it shows (:func:`rollout_note`). The plots are
inline SVG written here (two chart types do not justify a plotting library in the runtime
image), so the file opens anywhere, offline, and can be mailed or attached to a ticket.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from itertools import pairwise
from typing import Any

from triage.bus.offsets import watermarks
from triage.bus.settings import ConnectionSettings
from triage.consumer.reader import TopicReader, decoded
from triage.consumer.report_html import BASE_CSS, FONT, legend, nice_step, number, utc_time
from triage.consumer.settings import WorkerSettings

COLORS = {"baseline": "#8da0cb", "current": "#fc8d62", "ok": "#1b9e77", "drift": "#d62728",
          "insufficient_data": "#999999"}


def read_reports(connection: ConnectionSettings, topic: str, idle_s: float = 3.0
                 ) -> list[dict[str, Any]]:
    """Every report on the reports topic, oldest first; a window reported twice (at-least-once)
    counts once."""
    by_id: dict[str, dict[str, Any]] = {}
    with TopicReader(connection, topic, "drift_report") as reader:
        for _, raw in reader.read(idle_s=idle_s):
            record = decoded(raw)
            by_id[record["window_id"]] = record
    return sorted(by_id.values(), key=lambda r: (r["closed_at_ms"], r["window_id"]))


def unreported_samples(connection: ConnectionSettings, drift_topic: str,
                       reports: Sequence[dict[str, Any]]) -> int:
    """Samples on the drift topic that no report covers yet: what the monitor's open window
    holds (or will read). The topic's record count minus the samples and undecodable records
    of every distinct window reported; records deleted by retention are not counted."""
    marks = watermarks(connection, drift_topic)
    on_topic: int = sum(high - low for low, high in marks.values())
    reported: int = sum(r["samples"] + r["skipped"] for r in reports)
    return max(0, on_topic - reported)


def open_window_note(unreported: int, settings: WorkerSettings,
                     reports: Sequence[dict[str, Any]] = ()) -> str:
    """A sentence or two: how many samples wait in the open window, what closes it and the
    rate the workers sampled at. Both come from the latest of ``reports`` (oldest first) when
    it records them; what closes the window otherwise from ``settings`` (said to be this
    command's), and the rate is then not stated: this command's TRIAGE_SAMPLE_RATE says
    nothing about the workers'."""
    latest = reports[-1] if reports else {}
    by_count, by_time = latest.get("window_samples"), latest.get("window_minutes")
    if by_count or by_time:
        source = "as the monitor reported with its latest window"
    else:
        by_count = settings.drift.drift_window_samples
        by_time = settings.drift.drift_window_minutes
        source = ("as the monitor was started, if with this command's settings (TRIAGE_DRIFT_"
                  "WINDOW_SAMPLES, TRIAGE_DRIFT_WINDOW_MINUTES; no report states the monitor's)")
    closes = []
    if by_count:
        closes.append(f"{by_count:,} samples")
    if by_time:
        closes.append(f"{by_time:g} minutes")
    note = (f"{unreported:,} sample(s) on {settings.topics.drift_topic} are in no report yet: "
            f"the monitor's open window closes at {' or after '.join(closes)}, {source}.")
    rates = latest.get("sample_rates") or []
    if any(r["rate"] is not None for r in rates):
        note += (f" The workers sampled {rates_text(rates)} of orders in the latest window "
                 "reported.")
    elif reports:
        note += " The reports do not record the workers' sampling rate (they predate it)."
    return note


def rates_text(rates: Sequence[dict[str, Any]]) -> str:
    """The sampling rates of a report's ``sample_rates`` (rate 0..1 or None, samples) as text:
    ``"20%"`` for one rate, ``"20% (1,800 samples), 5% (200 samples)"`` for several,
    ``"not recorded"`` for none or only unrecorded ones."""
    known = [r for r in rates if r["rate"] is not None and r["samples"]]
    if not known:
        return "not recorded"
    if len(rates) == 1:
        return _percent(known[0]["rate"])
    return ", ".join(f"{'not recorded' if r['rate'] is None else _percent(r['rate'])} "
                     f"({r['samples']:,} samples)" for r in rates)


def _percent(share: float) -> str:
    return f"{share * 100:.4g}%"


def _merged_rates(reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``sample_rates`` of several reports added up (a report of contract version 1 has
    none: its samples count as not recorded)."""
    total: Counter[float | None] = Counter()
    for report in reports:
        rates = report.get("sample_rates") or []
        for r in rates:
            total[r["rate"]] += r["samples"]
        total[None] += report["samples"] - sum(r["samples"] for r in rates)
    return [{"rate": rate, "samples": total[rate]}
            for rate in sorted(total, key=lambda r: (r is None, r or 0.0)) if total[rate]]


def bar_chart(labels: Sequence[str], baseline: Sequence[float], current: Sequence[float], *,
              check: str, width: int = 560, plot_h: int = 150) -> str:
    """Grouped bars: baseline and current share per bin."""
    shown = [label.split(":")[0] if label.startswith("(") else label for label in labels]
    shown = [label if len(label) <= 22 else label[:21] + "…" for label in shown]
    rotate = len(labels) > 6 or max((len(label) for label in shown), default=0) > 12
    longest = max((len(label) for label in shown), default=0)
    left, right, top = 48, 10, 24
    bottom = 24 + round(0.64 * 6.5 * longest) if rotate else 30  # room for slanted labels
    plot_w, height = width - left - right, top + plot_h + bottom
    step = nice_step(max([*baseline, *current, 1e-9]) / 3)
    peak = step * math.ceil(max([*baseline, *current, 1e-9]) * 1.05 / step)
    group = plot_w / max(len(labels), 1)
    bar = group * 0.38
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' class='plot distribution' "
             f"data-check='{escape(check)}' width='{width}' height='{height}' "
             f"viewBox='0 0 {width} {height}' role='img' "
             f"aria-label='{escape(check)}: baseline and current distribution'>"]
    for k in range(round(peak / step) + 1):
        y = top + plot_h * (1 - k * step / peak)
        parts.append(f"<line x1='{left}' x2='{width - right}' y1='{y:.1f}' y2='{y:.1f}' "
                     f"stroke='#ddd'/><text x='{left - 4}' y='{y + 4:.1f}' text-anchor='end' "
                     f"{FONT}>{k * step * 100:g}%</text>")
    for i, label in enumerate(labels):
        x0 = left + i * group + group * 0.12
        for j, (series, value) in enumerate((("baseline", baseline[i]),
                                             ("current", current[i]))):
            h = plot_h * value / peak
            parts.append(f"<rect x='{x0 + j * bar:.1f}' y='{top + plot_h - h:.1f}' "
                         f"width='{bar:.1f}' height='{h:.1f}' fill='{COLORS[series]}'>"
                         f"<title>{escape(label)} {series}: {value:.2%}</title></rect>")
        cx, ly = left + (i + 0.5) * group, top + plot_h + 12
        short = shown[i]
        anchor = "end" if rotate else "middle"
        transform = f" transform='rotate(-40 {cx:.1f} {ly:.1f})'" if rotate else ""
        parts.append(f"<text x='{cx:.1f}' y='{ly:.1f}' text-anchor='{anchor}'{transform} "
                     f"{FONT}><title>{escape(label)}</title>{escape(short)}</text>")
    parts.append(legend(left, 6, [("baseline (training)", COLORS["baseline"]),
                                  ("current window", COLORS["current"])]))
    parts.append("</svg>")
    return "".join(parts)


def trend_chart(points: Sequence[tuple[float, float | None, str]], *, check: str,
                labels: Sequence[str] = (), axis: str = "", tips: Sequence[str] = (),
                width: int = 560, height: int = 240) -> str:
    """The statistic per window (dots coloured by verdict) and its threshold (dashed), on a log
    scale: a shift moves the statistic by orders of magnitude.

    ``points``: (statistic, threshold or None, verdict) per window, oldest first (a statistic
    of 0 is not drawn). ``labels``: the x-axis label of each window (its time, see
    :func:`window_axis`), at most 12 of them drawn; ``axis``: what the labels are; ``tips``:
    a tooltip line per window. Raises ValueError when ``labels`` or ``tips`` is given with
    another length than ``points``."""
    for name, given in (("labels", labels), ("tips", tips)):
        if given and len(given) != len(points):
            raise ValueError(f"{len(given)} {name} for {len(points)} points")
    labels = labels or [str(i + 1) for i in range(len(points))]
    # At most 12 labels, evenly spaced back from the latest window, which always has one.
    drawn = list(range(len(points) - 1, -1, -math.ceil(len(points) / 12)))[::-1]
    longest = max((len(labels[i]) for i in drawn), default=0)
    rotate = len(drawn) * (6.5 * longest + 8) > width - 80  # labels would overlap level
    # Room for the first and last labels: centred under their points, or slanted to the left.
    left = max(56, round(0.82 * 6.5 * longest) + 4) if rotate else 56
    right, top = 24 if rotate else max(24, round(3.25 * longest) + 4), 24
    bottom = (20 + round(0.64 * 6.5 * longest) if rotate else 24) + (16 if axis else 0)
    height = max(height, top + 150 + bottom)
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for s, t, _ in points for v in (s, t) if v is not None and v > 0]
    lo = math.floor(math.log10(min(values))) if values else -3
    hi = math.ceil(math.log10(max(values))) if values else 0
    hi = max(hi, lo + 1)

    def y(value: float) -> float:
        return top + plot_h * (1 - (math.log10(value) - lo) / (hi - lo))

    def x(i: int) -> float:
        return left + plot_w * (0.5 if len(points) == 1 else i / (len(points) - 1))

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' class='plot trend' "
             f"data-check='{escape(check)}' width='{width}' height='{height}' "
             f"viewBox='0 0 {width} {height}' role='img' "
             f"aria-label='{escape(check)}: statistic over the last windows'>"]
    for exponent in range(lo, hi + 1):
        yy = y(10.0 ** exponent)
        parts.append(f"<line x1='{left}' x2='{width - right}' y1='{yy:.1f}' y2='{yy:.1f}' "
                     f"stroke='#eee'/><text x='{left - 4}' y='{yy + 4:.1f}' text-anchor='end' "
                     f"{FONT}>1e{exponent}</text>")
    threshold = [(x(i), y(t)) for i, (_, t, _) in enumerate(points) if t]
    if threshold:
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in threshold)
        parts.append(f"<polyline points='{path}' fill='none' stroke='#555' "
                     f"stroke-dasharray='5,4'/>")
    statistic = [(x(i), y(s)) for i, (s, _, _) in enumerate(points) if s > 0]
    if len(statistic) > 1:
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in statistic)
        parts.append(f"<polyline points='{path}' fill='none' stroke='#bbb'/>")
    for i, (s, t, verdict) in enumerate(points):
        if s > 0:
            tip = tips[i] if tips else f"window {labels[i]}"
            parts.append(f"<circle cx='{x(i):.1f}' cy='{y(s):.1f}' r='4' "
                         f"fill='{COLORS.get(verdict, '#000')}'><title>{escape(tip)}: "
                         f"{number(s)} (threshold {number(t)}), {verdict}</title></circle>")
    ly = top + plot_h + 14
    for i in drawn:
        anchor = "end" if rotate else "middle"
        transform = f" transform='rotate(-35 {x(i):.1f} {ly:.1f})'" if rotate else ""
        parts.append(f"<text class='tick' x='{x(i):.1f}' y='{ly}' text-anchor='{anchor}'"
                     f"{transform} {FONT}>{escape(labels[i])}</text>")
    if axis:
        parts.append(f"<text class='axis' x='{left + plot_w / 2:.1f}' y='{height - 4}' "
                     f"text-anchor='middle' {FONT}>{escape(axis)}</text>")
    parts.append(legend(left, 6, [("statistic: ok", COLORS["ok"]),
                                  ("drift", COLORS["drift"]), ("threshold", "#555")],
                        dashed=2))
    parts.append("</svg>")
    return "".join(parts)


def window_axis(reports: Sequence[dict[str, Any]]) -> tuple[str, list[str]]:
    """How to place ``reports`` (oldest first) on a time axis: (what the labels are, one label
    per report). By their orders' event time (each window's latest order) when every report
    has it and it rises from window to window: a replay in event time closes its windows
    seconds apart, but they span days of orders. Otherwise (orders shuffled over a period,
    or reports that predate event times) by when the monitor closed each window. Labels are
    UTC, as short as keeps distinct times distinct."""
    last = [r["last_order_at_ms"] for r in reports if r.get("last_order_at_ms") is not None]
    if len(last) == len(reports) and all(a < b for a, b in pairwise(last)):
        return "latest order in each window (event time, UTC)", _time_labels(last)
    return "window closed (UTC)", _time_labels([r["closed_at_ms"] for r in reports])


def _time_labels(times_ms: Sequence[int]) -> list[str]:
    """UTC labels for ``times_ms``: month-day and minutes, with seconds where minutes would
    make distinct times look alike, with the year where the times span more than one."""
    moments = [datetime.fromtimestamp(ms / 1000, UTC) for ms in times_ms]
    year = "%Y-" if len({m.year for m in moments}) > 1 else ""
    minutes = [m.strftime(f"{year}%m-%d %H:%M") for m in moments]
    seconds = [m.strftime(f"{year}%m-%d %H:%M:%S") for m in moments]
    return minutes if len(set(minutes)) == len(set(seconds)) else seconds


# The check of a feature that follows a roll-out: zips are served from their available_from
# on, so its "available" share rises over time. Windows in event time see one stretch of the
# roll-out, the baseline all of it, so it alarms by design in a replay and after training.
ROLLOUT_CHECK = "zip_code_available"


def rollout_note(check: dict[str, Any], report: dict[str, Any]) -> str:
    """HTML explaining an alarm a zip roll-out causes by design, for a ``check`` (a DriftCheck
    record) of ``report`` that is :data:`ROLLOUT_CHECK` and alarmed; "" otherwise. It gives
    the window's "available" share against the baseline's and its orders' time span, how to
    tell the roll-out from drift, and what to do."""
    if check["name"] != ROLLOUT_CHECK or check["verdict"] != "drift":
        return ""
    bin_ = next((b for b in check["bins"] if b["label"] == "available"), None)
    if bin_ is None:
        return ""
    side = "above" if bin_["current"] > bin_["baseline"] else "below"
    span = ""
    if report.get("first_order_at_ms") is not None:
        span = (f" (from {utc_time(report['first_order_at_ms'])} to "
                f"{utc_time(report['last_order_at_ms'])})")
    return (
        f"<div class='note rollout' id='rollout-{escape(check['name'])}'>"
        f"<p><b>A roll-out shifts this check by design.</b> A zip counts as available once "
        f"its <code>available_from</code> has passed, so the share of orders to available "
        f"zips rises as zips roll out; the baseline is that share over the whole training "
        f"period. Windows of orders in event time see one stretch of the roll-out: a "
        f"replay's early windows sit below the baseline, its late ones above, and live "
        f"windows after training above. The recommendation check follows (HoldCheckDelivery)."
        f"</p><p>This window: available in {bin_['current']:.1%} of its orders{span} "
        f"against {bin_['baseline']:.1%} in training: {side} the baseline.</p>"
        f"<p><b>Roll-out or drift?</b> A roll-out explains a share below the baseline only "
        f"for orders early in the training period, and above it only for orders late in it "
        f"or after it; anything else is drift. Below, check that the workers read the "
        f"<code>zip_codes</code> stream up to the orders' time (an unknown zip counts "
        f"as not available) and whether zips were withdrawn. <b>What to do:</b> "
        f"in a replay, nothing: the alarm is the roll-out. Live and above, retrain on recent "
        f"history, so the baseline holds the zips served now.</p></div>")


_CSS = BASE_CSS + """\
.badge { display: inline-block; padding: 1px 8px; border-radius: 8px; color: #fff;
         font-size: 0.85em; }
.ok { background: #1b9e77; } .drift { background: #d62728; }
.insufficient_data { background: #999; }
section.check { border-top: 1px solid #ccc; padding-top: 0.5em; margin-top: 1.5em; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.note { color: #555; font-size: 0.9em; }
.rollout { border-left: 3px solid #8da0cb; padding: 0 0.8em; max-width: 60em; }
"""


def _badge(verdict: str) -> str:
    return f"<span class='badge {escape(verdict)}'>{escape(verdict.replace('_', ' '))}</span>"


def render(reports: Sequence[dict[str, Any]], *, last: int = 20,
           title: str = "Drift report", open_window: str = "") -> str:
    """The HTML page for the last ``last`` reports (oldest first in ``reports``);
    ``open_window`` is a sentence on the window not reported yet (:func:`open_window_note`)."""
    shown = list(reports)[-last:]
    head = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{escape(title)}</h1>")
    note = f"<p class='note'>{escape(open_window)}</p>" if open_window else ""
    if not shown:
        return head + "<p>No drift reports yet: is <code>triage drift monitor</code> " \
                      f"running, and has it closed a window?</p>{note}</body></html>"
    latest = shown[-1]
    # The distributions come from the latest window that was tested, if any was.
    tested = [r for r in shown if r["status"] != "insufficient_data"]
    pictured = tested[-1] if tested else latest
    alarms = {c["name"]: sum(1 for r in shown for d in r["checks"]
                             if d["name"] == c["name"] and d["verdict"] == "drift")
              for c in latest["checks"]}
    axis, labels = window_axis(shown)
    first_order = [r["first_order_at_ms"] for r in shown
                   if r.get("first_order_at_ms") is not None]
    last_order = [r["last_order_at_ms"] for r in shown if r.get("last_order_at_ms") is not None]
    orders = (f" · orders from {utc_time(min(first_order))} to {utc_time(max(last_order))}"
              if first_order and last_order else "")
    notes = {c["name"]: rollout_note(c, pictured) for c in pictured["checks"]}
    out = [head, f"<p class='meta'>Model <code>{escape(latest['model_version'])}</code> · "
           f"<a href='#windows'>{len(shown)} window(s) shown</a>, "
           f"{utc_time(shown[0]['opened_at_ms'])} to {utc_time(latest['closed_at_ms'])}{orders} · "
           f"sampled at {escape(rates_text(_merged_rates(shown)))} · latest window: "
           f"{latest['samples']} samples, {_badge(latest['status'])}</p>",
           f"<p class='note'>Each window is compared with the training baseline. A check "
           f"alarms when its Holm-adjusted p-value is at most α = {latest['alpha']:g} (the "
           f"chance that a window without drift raises any alarm) and its PSI is at least "
           f"0.01; a value never seen in training always alarms. Windows under "
           f"{latest['min_samples']} samples are not tested.</p>", note,
           "<table><tr><th>check</th><th>feature</th><th>test</th><th>latest verdict</th>"
           "<th>statistic</th><th>threshold</th><th>adjusted p</th><th>PSI</th>"
           f"<th>alarms in {len(shown)} windows</th></tr>"]
    for c in latest["checks"]:
        out.append(f"<tr><td><a href='#{escape(c['name'])}'>{escape(c['name'])}</a></td>"
                   f"<td>{escape(c['feature'])}</td><td>{escape(c['test'])}</td>"
                   f"<td>{_badge(c['verdict'])}"
                   + (f" <a href='#rollout-{escape(c['name'])}'>roll-out?</a>"
                      if notes.get(c["name"]) and pictured is latest else "")
                   + f"</td><td class='num'>{number(c['statistic'])}</td>"
                   f"<td class='num'>{number(c['threshold'])}</td>"
                   f"<td class='num'>{number(c['adjusted_p_value'])}</td>"
                   f"<td class='num'>{number(c['psi'])}</td>"
                   f"<td class='num'>{alarms[c['name']]}</td></tr>")
    out.append("</table>")
    if pictured is not latest:
        out.append(f"<p class='note'>The latest window was too small to test; the sections "
                   f"below show the latest tested one, closed {utc_time(pictured['closed_at_ms'])}"
                   f" with {pictured['samples']} samples.</p>")
    tips = [f"window closed {utc_time(r['closed_at_ms'])}, {r['samples']} samples"
            + (f", orders {utc_time(r['first_order_at_ms'])} to {utc_time(r['last_order_at_ms'])}"
               if r.get("first_order_at_ms") is not None else "") for r in shown]
    # Alarming checks first: they are what the reader opened the page for.
    for c in sorted(pictured["checks"], key=lambda c: c["verdict"] != "drift"):
        name = c["name"]
        history = [next((d for d in r["checks"] if d["name"] == name), None) for r in shown]
        points = [(d["statistic"], d["threshold"], d["verdict"]) if d else (0.0, None, "")
                  for d in history]
        bins = c["bins"]
        unseen = "".join(f"<li><code>{escape(k)}</code>: {v} sample(s)</li>"
                         for k, v in sorted(c["unseen"].items()))
        out.append(
            f"<section class='check' id='{escape(name)}'><h2>{escape(name)} "
            f"{_badge(c['verdict'])}</h2><p>feature <code>{escape(c['feature'])}</code> · "
            f"test {escape(c['test'])} · statistic {number(c['statistic'])} against threshold "
            f"{number(c['threshold'])} · p {number(c['p_value'])}, Holm-adjusted "
            f"{number(c['adjusted_p_value'])} · PSI {number(c['psi'])} · {c['samples']} samples"
            f"{' · ' + escape(c['reason']) if c['reason'] else ''}</p>" + notes[name]
            + (f"<p>Never seen in training:</p><ul>{unseen}</ul>" if unseen else "")
            + "<div class='plots'>"
            + bar_chart([b["label"] for b in bins], [b["baseline"] for b in bins],
                        [b["current"] for b in bins], check=name)
            + trend_chart(points, check=name, labels=labels, axis=axis, tips=tips)
            + "</div></section>")
    out.append(_windows_table(shown, axis, labels))
    out.append(f"<p class='note'>Generated {utc_time(int(datetime.now(UTC).timestamp() * 1000))} "
               "by <code>triage drift report</code>.</p></body></html>")
    return "".join(out)


def _windows_table(shown: Sequence[dict[str, Any]], axis: str, labels: Sequence[str]) -> str:
    """What each window shown held: when it closed, its samples, the event-time span of its
    orders, the rate(s) they were sampled at, its verdict and the checks that alarmed."""
    rows = []
    for report, label in zip(shown, labels, strict=True):
        drifted = ", ".join(c["name"] for c in report["checks"] if c["verdict"] == "drift")
        rates = rates_text(_merged_rates([report])) if report["samples"] else "-"
        rows.append(f"<tr><td>{escape(label)}</td><td>{utc_time(report['closed_at_ms'])}</td>"
                    f"<td class='num'>{report['samples']:,}</td>"
                    f"<td>{utc_time(report.get('first_order_at_ms'))}</td>"
                    f"<td>{utc_time(report.get('last_order_at_ms'))}</td>"
                    f"<td>{escape(rates)}</td>"
                    f"<td>{_badge(report['status'])}</td><td>{escape(drifted) or '-'}</td></tr>")
    return ("<section id='windows'><h2>Windows shown</h2><p class='note'>What each report "
            "says it saw: its samples, the time span of their orders (event time) and the "
            "share of orders the workers sampled. The trend charts place windows by the "
            f"first column.</p><table><tr><th>{escape(axis)}</th><th>closed</th><th>samples</th>"
            "<th>first order</th><th>last order</th><th>sampled at</th><th>status</th>"
            "<th>alarms</th></tr>" + "".join(rows) + "</table></section>")
