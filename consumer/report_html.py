"""What the HTML reports share (drift_report.py, backtest_report.py): the font of their SVG
text, UTC times, numbers, axis steps, legends and the page's base style. Both pages are one
self-contained file each, with inline SVG written by hand: no plotting library, no external
asset, so they open offline."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from html import escape

#: The attributes of every SVG text of the reports.
FONT = "font-family='system-ui, sans-serif' font-size='11'"

#: The style both pages begin with: body, title, tables, right-aligned numbers.
BASE_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #555; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def utc_time(ms: int | None) -> str:
    """``ms`` (milliseconds since the epoch) as ``YYYY-MM-DD HH:MM:SS UTC``; ``-`` for None."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def number(value: float | None) -> str:
    """Four significant digits, or scientific notation for very small or large values; ``-``
    for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.4g}"


def nice_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5 or 5 times a power of ten that is at least ``raw`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def legend(x: float, y: float, items: list[tuple[str, str]], dashed: int = -1) -> str:
    """SVG legend from (``x``, ``y``) rightwards (pixels): a swatch and a label per
    (label, colour) item; the item at index ``dashed`` is drawn as a dashed line."""
    parts = []
    lx = x
    for i, (label, color) in enumerate(items):
        if i == dashed:
            parts.append(f"<line x1='{lx}' x2='{lx + 14}' y1='{y + 5}' y2='{y + 5}' "
                         f"stroke='{color}' stroke-dasharray='4,3'/>")
        else:
            parts.append(f"<rect x='{lx}' y='{y}' width='10' height='10' fill='{color}'/>")
        parts.append(f"<text x='{lx + 17}' y='{y + 9}' {FONT}>{escape(label)}</text>")
        lx += 30 + 6.5 * len(label)
    return "".join(parts)
