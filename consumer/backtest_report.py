"""A backtest's HTML page: one self-contained file from the report of consumer/backtest.py.

The report (``Backtest.as_dict()``, the JSON file ``triage models backtest`` writes) says how
a candidate model version would have decided the orders of a stretch of history, against the
policy (model/policy.py), the active version (when one was given) and the predictions
published then. The page shows, in this order:

- the header: candidate and active versions, source, the orders' event-time range (UTC), the
  orders scored and how fast, the report id, and the report's warnings;
- the headline figures: each version's agreement with the policy, the candidate's with the
  published predictions, and the decisions that would change;
- agreement by hour (a line per version over the orders' event time, with the orders per
  hour as bars) and by the policy's class (a table);
- the confusion matrices (active vs candidate, each vs the policy), class names whole;
- the changed decisions by class, and the orders whose decision would change with their
  features.

Whether the candidate may be promoted is not decided here (model/registry.py decides). The
plot is inline SVG written here, in the drift report's style (consumer/drift_report.py,
consumer/report_html.py): the file opens anywhere, offline. Every text from the report is
escaped: order ids and statuses come from users.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from triage.consumer.drift_report import COLORS as DRIFT_COLORS
from triage.consumer.report_html import BASE_CSS, FONT, legend, nice_step, utc_time

#: The candidate is the drift report's "current", the active version its "baseline".
COLORS = {"candidate": DRIFT_COLORS["current"], "active": DRIFT_COLORS["baseline"],
          "orders": "#dddddd"}
#: A by-hour key of the report: the hour's start, UTC.
HOUR_FORMAT = "%Y-%m-%dT%H:00Z"

_CSS = BASE_CSS + """\
h2 { margin-top: 1.5em; border-top: 1px solid #ccc; padding-top: 0.5em; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
.warnings { border-left: 3px solid #d62728; padding: 0 0.8em; }
table.figures td:first-child { color: #555; }
table.confusion td.same { background: #f0f0f0; }
table.confusion td.off { background: #fde3d8; }
th.total, td.total { color: #555; }
caption { text-align: left; font-weight: bold; padding-bottom: 0.3em; }
.matrices { display: flex; flex-wrap: wrap; gap: 24px; }
td.missing { color: #999; }
"""


def percent(share: float | None) -> str:
    """A share (0..1) as a percentage with two decimals, more where two would show a share
    short of 1 as 100% or above 0 as 0%; ``-`` for None."""
    if share is None:
        return "-"
    text = f"{share * 100:.2f}"
    for digits in range(3, 7):
        if not ((share < 1 and float(text) >= 100) or (share > 0 and float(text) == 0)):
            break
        text = f"{share * 100:.{digits}f}"
    return text + "%"


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _trace(matrix: Sequence[Sequence[int]]) -> int:
    return sum(int(row[i]) for i, row in enumerate(matrix))


def _off_diagonal(matrix: Sequence[Sequence[int]]) -> int:
    return sum(int(v) for row in matrix for v in row) - _trace(matrix)


def _value(value: Any) -> str:
    """A feature value of an example as HTML: ``none`` (greyed) for a missing one, true/false,
    whole numbers without a decimal point."""
    if value is None:
        return "<td class='missing'>none</td>"
    if isinstance(value, bool):
        return f"<td>{'true' if value else 'false'}</td>"
    if isinstance(value, float):
        text = f"{value:.0f}" if value.is_integer() else f"{value:.10g}"
        return f"<td class='num'>{text}</td>"
    if isinstance(value, int):
        return f"<td class='num'>{value}</td>"
    return f"<td>{escape(str(value))}</td>"


def hour_chart(by_hour: dict[str, dict[str, Any]], *, active: bool, width: int = 900,
               height: int = 280) -> str:
    """Agreement with the policy by hour: a line per version (left axis, %), the orders per
    hour as grey bars (right axis), against the hours' event time (UTC).

    ``by_hour``: the report's ``by_hour``, hour key (``YYYY-MM-DDTHH:00Z``) -> ``orders``,
    ``candidate_policy_agreement`` and ``active_policy_agreement`` (shares 0..1); ``active``:
    whether an active version was scored (without one, its agreement is not drawn). Hours
    without orders are gaps: no bar, and the lines break there. Each hour is also a dot when
    the hours span at most three days, and an hour between gaps always is. Each hour's bar
    has a tooltip with its figures; ``width`` and ``height`` are pixels."""
    if not by_hour:
        return "<p class='note'>No orders, so nothing to show by hour.</p>"
    hours = {int(datetime.strptime(k, HOUR_FORMAT).replace(tzinfo=UTC).timestamp()) // 3600: v
             for k, v in by_hour.items()}
    first, last = min(hours), max(hours)
    span = last - first + 1
    series = [("candidate", "candidate_policy_agreement")]
    if active:
        series.append(("active", "active_policy_agreement"))
    shares = [float(v[key]) for v in hours.values() for _, key in series]
    low = min(shares)
    step = nice_step(max(1 - low, 1e-4) / 4)
    bottom_share = step * math.floor(low / step)
    if low - bottom_share < step / 4:  # room under the lowest point
        bottom_share -= step
    bottom_share = max(0.0, min(bottom_share, 1 - step))
    ticks = round((1 - bottom_share) / step)
    most = max(int(v["orders"]) for v in hours.values())
    order_step = nice_step(max(most, 1) / 4)
    order_peak = order_step * math.ceil(max(most, 1) / order_step)
    left, right, top, bottom = 56, 64, 28, 52
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / span

    def x(hour: int) -> float:
        return left + slot * (hour - first + 0.5)

    def y(share: float) -> float:
        return top + plot_h * (1 - (share - bottom_share) / (1 - bottom_share))

    def moment(hour: int, fmt: str) -> str:
        return datetime.fromtimestamp(hour * 3600, UTC).strftime(fmt)

    parts = [f"<svg class='plot by-hour' width='{width}' height='{height}' "
             f"viewBox='0 0 {width} {height}' role='img' aria-label='agreement with the "
             f"policy by hour, and orders per hour'>"]
    for k in range(ticks + 1):
        share = bottom_share + k * step
        yy = y(share)
        parts.append(f"<line x1='{left}' x2='{width - right}' y1='{yy:.1f}' y2='{yy:.1f}' "
                     f"stroke='#eee'/><text x='{left - 4}' y='{yy + 4:.1f}' text-anchor='end' "
                     f"{FONT}>{round(share * 100, 6):g}%</text>")
    for k in range(round(order_peak / order_step) + 1):
        yy = top + plot_h * (1 - k * order_step / order_peak)
        parts.append(f"<text x='{width - right + 4}' y='{yy + 4:.1f}' {FONT}>"
                     f"{k * order_step:,.0f}</text>")
    bar = max(slot * 0.8, 0.5)
    for hour in sorted(hours):
        figures = hours[hour]
        h = plot_h * int(figures["orders"]) / order_peak
        tip = (f"{moment(hour, '%Y-%m-%d %H:00')} UTC: {int(figures['orders']):,} orders, "
               + ", ".join(f"{name} {percent(float(figures[key]))}" for name, key in series))
        parts.append(f"<rect class='orders' data-hour='{moment(hour, HOUR_FORMAT)}' "
                     f"x='{x(hour) - bar / 2:.1f}' y='{top + plot_h - h:.1f}' "
                     f"width='{bar:.1f}' height='{h:.1f}' fill='{COLORS['orders']}'>"
                     f"<title>{escape(tip)}</title></rect>")
    runs: list[list[int]] = []
    for hour in sorted(hours):
        if runs and hour == runs[-1][-1] + 1:
            runs[-1].append(hour)
        else:
            runs.append([hour])
    for name, key in reversed(series):  # the candidate's line on top
        for run in runs:
            points = " ".join(f"{x(h):.1f},{y(float(hours[h][key])):.1f}" for h in run)
            if len(run) > 1:
                parts.append(f"<polyline class='{name}' points='{points}' fill='none' "
                             f"stroke='{COLORS[name]}' stroke-width='2'/>")
            if len(run) == 1 or span <= 72:
                parts.extend(f"<circle class='{name}' cx='{x(h):.1f}' "
                             f"cy='{y(float(hours[h][key])):.1f}' r='3' fill='{COLORS[name]}'/>"
                             for h in run)
    # At most 8 labels, on whole multiples of an interval (UTC): every hour up to every week.
    every = next((n for n in (1, 2, 3, 6, 12, 24, 48, 72, 168) if span / n <= 8),
                 168 * math.ceil(span / (168 * 8)))
    fmt = ("%Y-" if moment(first, "%Y") != moment(last, "%Y") else "") \
        + ("%m-%d" if every >= 24 else "%m-%d %H:00")
    for hour in range(every * math.ceil(first / every), last + 1, every):
        parts.append(f"<text class='tick' x='{x(hour):.1f}' y='{top + plot_h + 14}' "
                     f"text-anchor='middle' {FONT}>{moment(hour, fmt)}</text>")
    parts.append(f"<text class='axis' x='{left + plot_w / 2:.1f}' y='{height - 8}' "
                 f"text-anchor='middle' {FONT}>hour of the orders' event time (UTC)</text>")
    parts.append(legend(left, 6, [(f"{name} agrees with the policy", COLORS[name])
                                  for name, _ in series]
                        + [("orders per hour (right axis)", COLORS["orders"])]))
    parts.append("</svg>")
    return "".join(parts)


def confusion_table(matrix: Sequence[Sequence[int]], classes: Sequence[str], *, rows: str,
                    columns: str, ident: str) -> str:
    """A confusion matrix as an HTML table: ``matrix[i][j]`` orders that ``rows`` decided
    ``classes[i]`` and ``columns`` decided ``classes[j]``, with the totals of each row and
    column; the diagonal (same decision) is shaded, other cells with orders are marked."""
    head = "".join(f"<th>{escape(c)}</th>" for c in classes)
    out = [f"<table class='confusion' id='{escape(ident)}'><caption>{escape(rows)} (rows) "
           f"vs {escape(columns)} (columns)</caption><tr><th>{escape(rows)} ↓ · "
           f"{escape(columns)} →</th>{head}<th class='total'>total</th></tr>"]
    for i, name in enumerate(classes):
        cells = []
        for j, value in enumerate(matrix[i]):
            kind = " same" if i == j else " off" if value else ""
            cells.append(f"<td class='num{kind}'>{int(value):,}</td>")
        out.append(f"<tr><th>{escape(name)}</th>{''.join(cells)}"
                   f"<td class='num total'>{sum(int(v) for v in matrix[i]):,}</td></tr>")
    totals = "".join(f"<td class='num total'>{sum(int(row[j]) for row in matrix):,}</td>"
                     for j in range(len(classes)))
    out.append(f"<tr><th class='total'>total</th>{totals}<td class='num total'>"
               f"{sum(int(v) for row in matrix for v in row):,}</td></tr></table>")
    return "".join(out)


def _header(report: dict[str, Any]) -> str:
    active = report["active"]
    versions = (f"Candidate <code>{escape(report['candidate'])}</code> · active "
                + (f"<code>{escape(active)}</code>" if active is not None
                   else "none: compared with the policy alone"))
    asked = ("the whole history" if report["from_ms"] is None and report["to_ms"] is None
             else f"{utc_time(report['from_ms']) if report['from_ms'] is not None else 'start'}"
             f" to {utc_time(report['to_ms']) if report['to_ms'] is not None else 'end'}")
    rate = (f", {report['orders_per_s']:,} orders/s" if report.get("orders_per_s") is not None
            else "")
    out = [f"<p class='meta'>{versions} · source <code>{escape(str(report['source']))}</code>"
           f" · report <code>{escape(report['id'])}</code></p>",
           f"<p class='meta'>Orders from <span class='first'>"
           f"{utc_time(report['first_order_ms'])}</span> to <span class='last'>"
           f"{utc_time(report['last_order_ms'])}</span> (event time; range asked: {asked}) · "
           f"<span class='scored'>{report['orders']:,}</span> orders scored in "
           f"{report['elapsed_s']:g} s{rate}</p>"]
    if report["warnings"]:
        items = "".join(f"<li>{escape(w)}</li>" for w in report["warnings"])
        out.append(f"<div class='warnings'><p><b>Warnings</b></p><ul>{items}</ul></div>")
    return "".join(out)


def _figures(report: dict[str, Any]) -> str:
    orders = report["orders"]
    confusion = report["confusion"]
    active = report["active"] is not None
    candidate_share = report["candidate_policy_agreement"]
    active_share = report["active_policy_agreement"]
    rows = [("candidate agrees with the policy",
             f"{percent(candidate_share)} ({_trace(confusion['candidate_vs_policy']):,} of "
             f"{orders:,} orders)" if orders else "no orders scored", "candidate")]
    if active and not orders:
        rows.append(("active agrees with the policy", "no orders scored", "active"))
    elif active:
        rows.append(("active agrees with the policy",
                     f"{percent(active_share)} ({_trace(confusion['active_vs_policy']):,} of "
                     f"{orders:,} orders)", "active"))
        if candidate_share is not None and active_share is not None:
            rows.append(("candidate minus active",
                         f"{(candidate_share - active_share) * 100:+.2f} percentage points",
                         "difference"))
        changed = _off_diagonal(confusion["active_vs_candidate"])
        rows.append(("decisions that would change (active to candidate)",
                     f"{changed:,} ({percent(changed / orders if orders else None)} of orders)",
                     "changed"))
    else:
        rows.append(("active agrees with the policy", "no active version", "active"))
    if report["published_orders"]:
        rows.append(("candidate agrees with the published predictions",
                     f"{percent(report['published_agreement'])} (of "
                     f"{report['published_orders']:,} orders with a published prediction)",
                     "published"))
    else:
        rows.append(("candidate agrees with the published predictions",
                     "no published predictions for these orders", "published"))
    body = "".join(f"<tr class='{name}'><td>{escape(label)}</td><td>{text}</td></tr>"
                   for label, text, name in rows)
    return ("<h2 id='figures'>Headline figures</h2><table class='figures'>" + body
            + "</table><p class='note'>Agreement: the share of orders on which a version's "
              "decision equals the policy's (model/policy.py) or the last prediction "
              "published for the order.</p>")


def _by_class(report: dict[str, Any]) -> str:
    by_class = report["by_class"]
    active = report["active"] is not None
    orders = report["orders"] or 1
    names = [c for c in report["classes"] if c in by_class]
    names += sorted(c for c in by_class if c not in names)
    head = "<th>candidate agrees</th>" + ("<th>active agrees</th>" if active else "")
    rows = []
    for name in names:
        tally = by_class[name]
        cells = f"<td class='num'>{percent(tally['candidate_policy_agreement'])}</td>"
        if active:
            cells += f"<td class='num'>{percent(tally['active_policy_agreement'])}</td>"
        rows.append(f"<tr data-class='{escape(name)}'><th>{escape(name)}</th>"
                    f"<td class='num'>{int(tally['orders']):,}</td>"
                    f"<td class='num'>{percent(int(tally['orders']) / orders)}</td>{cells}</tr>")
    if not rows:
        return "<p class='note'>No orders, so nothing to show by class.</p>"
    return ("<table class='by-class'><tr><th>the policy's class</th><th>orders</th>"
            f"<th>share of orders</th>{head}</tr>" + "".join(rows) + "</table>")


def _changed(report: dict[str, Any]) -> str:
    if report["active"] is None:
        return ("<p class='note'>No active version, so no decision changes: the orders below "
                "are those on which the candidate disagrees with the policy (the candidate vs "
                "policy matrix above counts them by class).</p>")
    changes = [(a, c, int(n)) for a, to in report["changed_by_class"].items()
               for c, n in to.items()]
    if not changes:
        return "<p class='note'>No decision would change.</p>"
    orders = report["orders"] or 1
    rows = "".join(f"<tr><td>{escape(a)}</td><td>{escape(c)}</td><td class='num'>{n:,}</td>"
                   f"<td class='num'>{percent(n / orders)}</td></tr>"
                   for a, c, n in sorted(changes, key=lambda t: -t[2]))
    return ("<table class='changed'><tr><th>active decides</th><th>candidate would decide</th>"
            "<th>orders</th><th>share of orders</th></tr>" + rows + "</table>")


def _examples(report: dict[str, Any]) -> str:
    examples = report["examples"]
    active = report["active"] is not None
    matrix = report["confusion"]["active_vs_candidate" if active else "candidate_vs_policy"]
    total = _off_diagonal(matrix)
    what = ("whose decision would change" if active
            else "on which the candidate disagrees with the policy")
    if not examples:
        return f"<p class='note'>No order {what}.</p>"
    features: list[str] = []
    for example in examples:
        features += [f for f in example["features"] if f not in features]
    head = ("<tr><th>order id</th><th>order time (UTC)</th><th>policy</th>"
            + ("<th>active</th>" if active else "") + "<th>candidate</th>"
            + "".join(f"<th>{escape(f)}</th>" for f in features) + "</tr>")
    rows = []
    for example in examples:
        rows.append(
            f"<tr><td class='order'>{escape(str(example['order_id']))}</td>"
            f"<td>{utc_time(example['timestamp_ms'])}</td><td>{escape(example['policy'])}</td>"
            + (f"<td>{escape(str(example['active']))}</td>" if active else "")
            + f"<td>{escape(example['candidate'])}</td>"
            + "".join(_value(example["features"].get(f)) for f in features) + "</tr>")
    limit = report["examples_limit"]
    shown = (f"All {len(examples):,} orders {what}" if len(examples) >= total
             else f"The first {len(examples):,} of the {total:,} orders {what} (the report "
                  f"keeps at most {limit:,})")
    return (f"<p class='note examples-count'>{shown}, with the features they were scored "
            f"on.</p><table class='examples'>{head}{''.join(rows)}</table>")


def render(report: dict[str, Any]) -> str:
    """The HTML page (one self-contained document, UTF-8 text) for ``report``: a backtest's
    report as ``Backtest.as_dict()`` makes it or as read back from its JSON file (times in
    milliseconds since the epoch, agreements as shares 0..1, confusion matrices indexed by
    ``report["classes"]``, rows first)."""
    title = f"Backtest of {report['candidate']}"
    active = report["active"] is not None
    classes = report["classes"]
    confusion = report["confusion"]
    matrices = [confusion_table(confusion["candidate_vs_policy"], classes, rows="candidate",
                                columns="policy", ident="candidate_vs_policy")]
    if active:
        matrices = [confusion_table(confusion["active_vs_candidate"], classes, rows="active",
                                    columns="candidate", ident="active_vs_candidate"),
                    *matrices,
                    confusion_table(confusion["active_vs_policy"], classes, rows="active",
                                    columns="policy", ident="active_vs_policy")]
    what = "Orders whose decision would change" if active else \
        "Orders on which the candidate disagrees with the policy"
    return "".join([
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1>",
        _header(report),
        _figures(report),
        "<h2 id='by-hour'>Agreement with the policy by hour</h2>",
        hour_chart(report["by_hour"], active=active),
        "<h2 id='by-class'>Agreement by the policy's class</h2>",
        _by_class(report),
        "<h2 id='confusion'>Confusion matrices</h2><div class='matrices'>",
        *matrices,
        "</div><h2 id='changed'>Changed decisions by class</h2>",
        _changed(report),
        f"<h2 id='examples'>{escape(what)}</h2>",
        _examples(report),
        f"<p class='note'>Backtest report <code>{escape(report['id'])}</code>.</p>"
        "</body></html>"])


def write_html(report: dict[str, Any], path: Path) -> Path:
    """Write :func:`render`'s page for ``report`` to ``path`` (UTF-8; its folder is made when
    missing); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(report), encoding="utf-8")
    return path
