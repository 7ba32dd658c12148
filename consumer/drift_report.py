"""``triage drift report``: one self-contained HTML page from the drift reports topic.

For every check (each feature, inventory twice, and the predictions) the page shows the
baseline and the latest window's distributions side by side, the statistic against its
threshold and the verdict, and the statistic's trend over the last K windows. The plots are
inline SVG written here (two chart types do not justify a plotting library in the runtime
image), so the file opens anywhere, offline, and can be mailed or attached to a ticket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

from triage.bus.offsets import watermarks
from triage.bus.settings import ConnectionSettings, Settings
from triage.consumer.reader import TopicReader, decoded

COLORS = {"baseline": "#8da0cb", "current": "#fc8d62", "ok": "#1b9e77", "drift": "#d62728",
          "insufficient_data": "#999999"}
_FONT = "font-family='system-ui, sans-serif' font-size='11'"


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


def open_window_note(unreported: int, settings: Settings) -> str:
    """One sentence: how many samples wait in the open window and what closes it."""
    closes = []
    if settings.drift.drift_window_samples:
        closes.append(f"{settings.drift.drift_window_samples:,} samples "
                      "(TRIAGE_DRIFT_WINDOW_SAMPLES)")
    if settings.drift.drift_window_minutes:
        closes.append(f"{settings.drift.drift_window_minutes:g} minutes "
                      "(TRIAGE_DRIFT_WINDOW_MINUTES)")
    return (f"{unreported:,} sample(s) on {settings.topics.drift_topic} are in no report yet: the "
            f"monitor's open window closes at {' or after '.join(closes)}, as the monitor was "
            f"started (these are this command's settings). The sampler copies "
            f"{settings.scorer.sample_rate:.0%} of orders (TRIAGE_SAMPLE_RATE).")


def _time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.4g}"


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
    step = _nice_step(max([*baseline, *current, 1e-9]) / 3)
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
                     f"{_FONT}>{k * step * 100:g}%</text>")
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
                     f"{_FONT}><title>{escape(label)}</title>{escape(short)}</text>")
    parts.append(_legend(left, 6, [("baseline (training)", COLORS["baseline"]),
                                   ("current window", COLORS["current"])]))
    parts.append("</svg>")
    return "".join(parts)


def trend_chart(points: Sequence[tuple[float, float | None, str]], *, check: str,
                width: int = 560, height: int = 240) -> str:
    """The statistic per window (dots coloured by verdict) and its threshold (dashed), on a log
    scale: a shift moves the statistic by orders of magnitude."""
    left, right, top, bottom = 56, 24, 24, 36
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
                     f"{_FONT}>1e{exponent}</text>")
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
            parts.append(f"<circle cx='{x(i):.1f}' cy='{y(s):.1f}' r='4' "
                         f"fill='{COLORS.get(verdict, '#000')}'><title>window {i + 1}: "
                         f"{_fmt(s)} (threshold {_fmt(t)}), {verdict}</title></circle>")
    for i in range(len(points)):
        if len(points) <= 12 or i % math.ceil(len(points) / 12) == 0 or i == len(points) - 1:
            parts.append(f"<text x='{x(i):.1f}' y='{top + plot_h + 16}' text-anchor='middle' "
                         f"{_FONT}>{i + 1 - len(points) if i < len(points) - 1 else 'latest'}"
                         f"</text>")
    parts.append(_legend(left, 6, [("statistic: ok", COLORS["ok"]),
                                   ("drift", COLORS["drift"]), ("threshold", "#555")],
                         dashed=2))
    parts.append("</svg>")
    return "".join(parts)


def _nice_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5 or 5 times a power of ten that is at least ``raw``."""
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _legend(x: float, y: float, items: list[tuple[str, str]], dashed: int = -1) -> str:
    parts = []
    lx = x
    for i, (label, color) in enumerate(items):
        if i == dashed:
            parts.append(f"<line x1='{lx}' x2='{lx + 14}' y1='{y + 5}' y2='{y + 5}' "
                         f"stroke='{color}' stroke-dasharray='4,3'/>")
        else:
            parts.append(f"<rect x='{lx}' y='{y}' width='10' height='10' fill='{color}'/>")
        parts.append(f"<text x='{lx + 17}' y='{y + 9}' {_FONT}>{escape(label)}</text>")
        lx += 30 + 6.5 * len(label)
    return "".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #555; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 8px; color: #fff;
         font-size: 0.85em; }
.ok { background: #1b9e77; } .drift { background: #d62728; }
.insufficient_data { background: #999; }
section.check { border-top: 1px solid #ccc; padding-top: 0.5em; margin-top: 1.5em; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.note { color: #555; font-size: 0.9em; }
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
    out = [head, f"<p class='meta'>Model <code>{escape(latest['model_version'])}</code> · "
           f"{len(shown)} window(s) shown, {_time(shown[0]['opened_at_ms'])} to "
           f"{_time(latest['closed_at_ms'])} · latest window: {latest['samples']} samples, "
           f"{_badge(latest['status'])}</p>",
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
                   f"<td>{_badge(c['verdict'])}</td><td class='num'>{_fmt(c['statistic'])}</td>"
                   f"<td class='num'>{_fmt(c['threshold'])}</td>"
                   f"<td class='num'>{_fmt(c['adjusted_p_value'])}</td>"
                   f"<td class='num'>{_fmt(c['psi'])}</td>"
                   f"<td class='num'>{alarms[c['name']]}</td></tr>")
    out.append("</table>")
    if pictured is not latest:
        out.append(f"<p class='note'>The latest window was too small to test; the sections "
                   f"below show the latest tested one, closed {_time(pictured['closed_at_ms'])}"
                   f" with {pictured['samples']} samples.</p>")
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
            f"test {escape(c['test'])} · statistic {_fmt(c['statistic'])} against threshold "
            f"{_fmt(c['threshold'])} · p {_fmt(c['p_value'])}, Holm-adjusted "
            f"{_fmt(c['adjusted_p_value'])} · PSI {_fmt(c['psi'])} · {c['samples']} samples"
            f"{' · ' + escape(c['reason']) if c['reason'] else ''}</p>"
            + (f"<p>Never seen in training:</p><ul>{unseen}</ul>" if unseen else "")
            + "<div class='plots'>"
            + bar_chart([b["label"] for b in bins], [b["baseline"] for b in bins],
                        [b["current"] for b in bins], check=name)
            + trend_chart(points, check=name) + "</div></section>")
    out.append(f"<p class='note'>Generated {_time(int(datetime.now(UTC).timestamp() * 1000))} "
               "by <code>triage drift report</code>.</p></body></html>")
    return "".join(out)
