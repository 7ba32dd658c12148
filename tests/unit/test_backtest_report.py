"""The backtest's HTML page (consumer/backtest_report.py): one self-contained, parseable file
that shows a report's header, headline figures, agreement by hour and by class, confusion
matrices, changed decisions and example orders where they belong, escapes every text from
the report, and fetches nothing. The reports are built by hand (one small but realistic, one
without an active version, one of nothing scored), plus one made by Backtest itself to hold
the page to the report's real shape."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from triage.consumer.backtest import Backtest, Batch
from triage.consumer.backtest_report import render, write_html
from triage.model.features import FeatureBatch
from triage.model.orders import OrderColumns
from triage.model.policy import CLASSES

SCRIPT_ID = "<script>alert('id')</script>"
ATTRIBUTE_ID = "\"'><img src=https://evil.example/x.png>"
STATUS = "<b>PENDING</b>"


def _ms(text: str) -> int:
    """Milliseconds since the epoch of a UTC time ``YYYY-MM-DD HH:MM:SS``."""
    return int(datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
               .timestamp() * 1000)


def _tally(orders: int, candidate: int, active: int) -> dict[str, Any]:
    return {"orders": orders, "candidate_policy_agreement": candidate / orders,
            "active_policy_agreement": active / orders}


@pytest.fixture
def report() -> dict[str, Any]:
    """1,000 orders over three hours (none at 12:00), scored by candidate v7 and active v6.

    Rows of each matrix follow CLASSES (Deliver, HoldCheckAvailability, HoldCheckDelivery,
    HoldCheckPayment, Decline). The candidate agrees with the policy on 994 orders, the
    active on 980; 20 decisions would change: 7 Deliver -> Decline, 13 HoldCheckDelivery ->
    Deliver (active -> candidate). 900 orders had a published prediction, 891 equal to the
    candidate's. The report keeps 3 examples."""
    return {
        "id": "bt-20240302T080000Z-abc123", "candidate": "v7", "active": "v6",
        "source": "kafka", "from_ms": _ms("2024-03-01 10:00:00"),
        "to_ms": _ms("2024-03-01 14:00:00"),
        "first_order_ms": _ms("2024-03-01 10:00:05"), "last_order_ms": _ms("2024-03-01 13:59:58"),
        "orders": 1000, "elapsed_s": 0.02, "orders_per_s": 50000,
        "candidate_policy_agreement": 0.994, "active_policy_agreement": 0.98,
        "published_orders": 900, "published_agreement": 0.99,
        "classes": list(CLASSES),
        "confusion": {
            "candidate_vs_policy": [[690, 0, 3, 0, 2], [0, 100, 0, 0, 0], [1, 0, 97, 0, 0],
                                    [0, 0, 0, 60, 0], [0, 0, 0, 0, 47]],
            "active_vs_policy": [[680, 0, 0, 0, 9], [0, 100, 0, 0, 0], [11, 0, 100, 0, 0],
                                 [0, 0, 0, 60, 0], [0, 0, 0, 0, 40]],
            "active_vs_candidate": [[682, 0, 0, 0, 7], [0, 100, 0, 0, 0], [13, 0, 98, 0, 0],
                                    [0, 0, 0, 60, 0], [0, 0, 0, 0, 40]]},
        "changed_by_class": {"Deliver": {"Decline": 7}, "HoldCheckDelivery": {"Deliver": 13}},
        "by_hour": {"2024-03-01T10:00Z": _tally(400, 398, 392),
                    "2024-03-01T11:00Z": _tally(350, 347, 343),
                    "2024-03-01T13:00Z": _tally(250, 249, 245)},
        "by_class": {"Decline": _tally(49, 47, 40), "Deliver": _tally(691, 690, 680),
                     "HoldCheckAvailability": _tally(100, 100, 100),
                     "HoldCheckDelivery": _tally(100, 97, 100),
                     "HoldCheckPayment": _tally(60, 60, 60)},
        "examples": [
            {"order_id": SCRIPT_ID, "timestamp_ms": _ms("2024-03-01 10:17:00"),
             "candidate": "Decline", "active": "Deliver", "policy": "Decline",
             "features": {"order_hour_of_day": 3, "inventory": None,
                          "payment_status": STATUS, "zip_code_available": False}},
            {"order_id": ATTRIBUTE_ID, "timestamp_ms": _ms("2024-03-01 11:02:30"),
             "candidate": "Deliver", "active": "HoldCheckDelivery", "policy": "Deliver",
             "features": {"order_hour_of_day": 11, "inventory": 12.0,
                          "payment_status": "OK", "zip_code_available": True}},
            {"order_id": "O-3", "timestamp_ms": _ms("2024-03-01 13:45:00"),
             "candidate": "Deliver", "active": "HoldCheckDelivery", "policy": "HoldCheckDelivery",
             "features": {"order_hour_of_day": 13, "inventory": 2.5,
                          "payment_status": "OK", "zip_code_available": False}}],
        "examples_limit": 3,
        "warnings": ["payments partition 2 begins at offset 40: retention removed its "
                     "earlier events, so orders before them may see less history"],
    }


@pytest.fixture
def without_active(report: dict[str, Any]) -> dict[str, Any]:
    """The same orders, scored by the candidate alone: as Backtest makes it, the active
    matrices are zero, the active agreement of every hour and class 0, no changes, and the
    examples are the orders on which the candidate disagrees with the policy (6)."""
    out = copy.deepcopy(report)
    zero = [[0] * len(CLASSES) for _ in CLASSES]
    out.update(active=None, active_policy_agreement=None, changed_by_class={},
               examples=out["examples"][:1], examples_limit=1000)
    out["confusion"].update(active_vs_policy=zero, active_vs_candidate=zero)
    for tally in [*out["by_hour"].values(), *out["by_class"].values()]:
        tally["active_policy_agreement"] = 0.0
    out["examples"][0]["active"] = None
    out["examples"][0]["candidate"] = "Deliver"
    return out


@pytest.fixture
def nothing() -> dict[str, Any]:
    """A backtest of a range without orders, compared with the policy alone, from CSVs."""
    zero = [[0] * len(CLASSES) for _ in CLASSES]
    return {"id": "bt-empty", "candidate": "v2", "active": None, "source": "data/ & co",
            "from_ms": None, "to_ms": None, "first_order_ms": None, "last_order_ms": None,
            "orders": 0, "elapsed_s": 0.0, "orders_per_s": None,
            "candidate_policy_agreement": None, "active_policy_agreement": None,
            "published_orders": 0, "published_agreement": None, "classes": list(CLASSES),
            "confusion": {"candidate_vs_policy": zero, "active_vs_policy": zero,
                          "active_vs_candidate": zero},
            "changed_by_class": {}, "by_hour": {}, "by_class": {}, "examples": [],
            "examples_limit": 1000, "warnings": []}


# -- a small document tree, from the standard library's parser -------------------------------

VOID = {"meta", "br", "hr", "img", "input", "link", "source", "col", "area", "base", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str | None]
    children: list[Node | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def all(self, tag: str, cls: str | None = None) -> list[Node]:
        """Every descendant ``tag`` (with class ``cls``), in document order."""
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if child.tag == tag and (cls is None or cls in child.classes()):
                    found.append(child)
                found += child.all(tag, cls)
        return found

    def one(self, tag: str, **attrs: str) -> Node:
        hits = [n for n in self.all(tag) if all(n.attrs.get(k) == v for k, v in attrs.items())]
        assert len(hits) == 1, (tag, attrs, len(hits))
        return hits[0]

    def rows(self) -> list[list[str]]:
        """A table's cells' texts, row by row."""
        return [[c.text for c in tr.children if isinstance(c, Node) and c.tag in ("th", "td")]
                for tr in self.all("tr")]


class _Tree(HTMLParser):
    """Builds the tree, requiring every element to close in order; notes anything that could
    fetch a resource (a src or a non-local href, an http(s) URL in any attribute, scripts,
    images, frames, style sheets, url() or @import in the style)."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Node("#document", {})
        self.stack = [self.root]
        self.fetching: list[str] = []
        self.style = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        for name, value in attrs:
            if name == "src" or (name == "href" and not (value or "").startswith("#")) \
                    or re.search(r"https?:", value or ""):
                self.fetching.append(f"{tag} {name}={value}")
        if tag in ("script", "img", "iframe", "link", "object", "embed"):
            self.fetching.append(tag)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)
        if self.stack[-1].tag == "style":
            self.style += data


def parse(html: str) -> tuple[Node, _Tree]:
    tree = _Tree()
    tree.feed(html)
    tree.close()
    assert [n.tag for n in tree.stack] == ["#document"], "elements left open"
    return tree.root, tree


def _figures(page: Node) -> dict[str, str]:
    return {tr.attrs["class"] or "": tr.text for tr in page.one("table", **{"class": "figures"})
            .all("tr")}


# -- the tests ------------------------------------------------------------------------------

def test_the_page_parses_whole_and_fetches_nothing(report: dict[str, Any]) -> None:
    html = render(report)
    page, tree = parse(html)
    assert html.startswith("<!DOCTYPE html>")
    assert [n.tag for n in page.children if isinstance(n, Node)] == ["html"]
    assert tree.fetching == []
    assert "url(" not in tree.style and "@import" not in tree.style
    assert page.all("svg"), "the chart is inline"


def test_every_text_from_the_report_is_escaped(report: dict[str, Any]) -> None:
    html = render(report)
    page, _ = parse(html)
    assert SCRIPT_ID not in html and "&lt;script&gt;" in html
    assert page.all("script") == [] and page.all("img") == []
    examples = page.one("table", **{"class": "examples"})
    assert examples.all("b") == [] and STATUS in examples.text
    ids = [td.text for td in page.all("td", "order")]
    assert ids == [SCRIPT_ID, ATTRIBUTE_ID, "O-3"]  # shown as the user wrote them


def test_the_header_names_the_versions_source_range_rate_and_id(
        report: dict[str, Any]) -> None:
    page, _ = parse(render(report))
    assert page.one("h1").text == "Backtest of v7"
    meta = " ".join(p.text for p in page.all("p", "meta"))
    assert "Candidate v7 · active v6 · source kafka" in meta
    assert "report bt-20240302T080000Z-abc123" in meta
    assert page.one("span", **{"class": "first"}).text == "2024-03-01 10:00:05 UTC"
    assert page.one("span", **{"class": "last"}).text == "2024-03-01 13:59:58 UTC"
    assert "2024-03-01 10:00:00 UTC to 2024-03-01 14:00:00 UTC" in meta  # the range asked
    assert page.one("span", **{"class": "scored"}).text == "1,000"
    assert "50,000 orders/s" in meta
    warnings = page.one("div", **{"class": "warnings"}).all("li")
    assert [li.text for li in warnings] == report["warnings"]


def test_the_headline_figures_are_each_versions_agreement(report: dict[str, Any]) -> None:
    html = render(report)
    figures = _figures(parse(html)[0])
    assert "99.40% (994 of 1,000 orders)" in figures["candidate"]
    assert "98.00% (980 of 1,000 orders)" in figures["active"]
    assert "+1.40 percentage points" in figures["difference"]
    assert "20 (2.00% of orders)" in figures["changed"]
    assert "99.00% (of 900 orders with a published prediction)" in figures["published"]
    assert "promot" not in html.lower()  # the gate is model/registry.py's


def test_agreement_by_hour_is_drawn_on_the_hours_time(report: dict[str, Any]) -> None:
    page, _ = parse(render(report))
    chart = page.one("svg", **{"class": "plot by-hour"})
    bars = chart.all("rect", "orders")
    assert [b.attrs["data-hour"] for b in bars] == list(report["by_hour"])
    assert [b.text for b in bars] == [
        "2024-03-01 10:00 UTC: 400 orders, candidate 99.50%, active 98.00%",
        "2024-03-01 11:00 UTC: 350 orders, candidate 99.14%, active 98.00%",
        "2024-03-01 13:00 UTC: 250 orders, candidate 99.60%, active 98.00%"]
    heights = [float(b.attrs["height"] or 0) for b in bars]
    assert heights[0] > heights[1] > heights[2] > 0  # 400, 350, 250 orders
    centres = [float(b.attrs["x"] or 0) + float(b.attrs["width"] or 0) / 2 for b in bars]
    assert centres[2] - centres[1] == pytest.approx(2 * (centres[1] - centres[0]), abs=0.2)
    # 10:00 and 11:00 are joined; 13:00, after an hour without orders, stands alone.
    for version in ("candidate", "active"):
        lines = chart.all("polyline", version)
        assert len(lines) == 1 and len((lines[0].attrs["points"] or "").split()) == 2
        assert len(chart.all("circle", version)) == 3
    line = [tuple(map(float, p.split(","))) for p in
            (chart.all("polyline", "candidate")[0].attrs["points"] or "").split()]
    assert line[0][1] < line[1][1]  # 99.50% at 10:00 is drawn above 99.14% at 11:00
    active = [float(c.attrs["cy"] or 0) for c in chart.all("circle", "active")]
    assert active[0] == active[1] == active[2]  # 98.00% every hour
    assert max(float(c.attrs["cy"] or 0) for c in chart.all("circle", "candidate")) \
        < active[0]


def test_agreement_by_class_follows_the_class_order(report: dict[str, Any]) -> None:
    page, _ = parse(render(report))
    rows = page.one("table", **{"class": "by-class"}).rows()
    assert rows[0] == ["the policy's class", "orders", "share of orders", "candidate agrees",
                       "active agrees"]
    assert rows[1:] == [
        ["Deliver", "691", "69.10%", "99.86%", "98.41%"],
        ["HoldCheckAvailability", "100", "10.00%", "100.00%", "100.00%"],
        ["HoldCheckDelivery", "100", "10.00%", "97.00%", "100.00%"],
        ["HoldCheckPayment", "60", "6.00%", "100.00%", "100.00%"],
        ["Decline", "49", "4.90%", "95.92%", "81.63%"]]


def test_the_confusion_matrices_have_whole_class_names_and_totals(
        report: dict[str, Any]) -> None:
    page, _ = parse(render(report))
    for name, rows, columns in (("active_vs_candidate", "active", "candidate"),
                                ("candidate_vs_policy", "candidate", "policy"),
                                ("active_vs_policy", "active", "policy")):
        table = page.one("table", id=name)
        assert table.one("caption").text == f"{rows} (rows) vs {columns} (columns)"
        cells = table.rows()
        assert cells[0][1:] == [*CLASSES, "total"]
        assert [r[0] for r in cells[1:]] == [*CLASSES, "total"]
        matrix = report["confusion"][name]
        for i, row in enumerate(matrix):
            assert cells[i + 1][1:] == [f"{v:,}" for v in row] + [f"{sum(row):,}"]
        assert cells[-1][1:] == [f"{sum(r[j] for r in matrix):,}" for j in range(5)] + ["1,000"]
    # The cells where the two disagree are marked, those where they agree shaded.
    table = page.one("table", id="active_vs_candidate")
    assert [td.text for td in table.all("td", "off")] == ["7", "13"]
    assert [td.text for td in table.all("td", "same")] == ["682", "100", "98", "60", "40"]


def test_the_changed_decisions_and_their_orders_are_listed(report: dict[str, Any]) -> None:
    page, _ = parse(render(report))
    assert page.one("table", **{"class": "changed"}).rows() == [
        ["active decides", "candidate would decide", "orders", "share of orders"],
        ["HoldCheckDelivery", "Deliver", "13", "1.30%"],
        ["Deliver", "Decline", "7", "0.70%"]]
    assert page.one("h2", id="examples").text == "Orders whose decision would change"
    note = page.one("p", **{"class": "note examples-count"}).text
    assert "The first 3 of the 20 orders whose decision would change" in note
    assert "at most 3" in note
    rows = page.one("table", **{"class": "examples"}).rows()
    assert rows[0] == ["order id", "order time (UTC)", "policy", "active", "candidate",
                       "order_hour_of_day", "inventory", "payment_status",
                       "zip_code_available"]
    assert rows[1] == [SCRIPT_ID, "2024-03-01 10:17:00 UTC", "Decline", "Deliver", "Decline",
                       "3", "none", STATUS, "false"]
    assert rows[2][5:] == ["11", "12", "OK", "true"]
    assert rows[3][5:] == ["13", "2.5", "OK", "false"]


def test_without_an_active_version_the_page_compares_with_the_policy_alone(
        without_active: dict[str, Any]) -> None:
    html = render(without_active)
    page, tree = parse(html)
    assert tree.fetching == []
    assert "active none: compared with the policy alone" in page.all("p", "meta")[0].text
    assert "no active version" in _figures(page)["active"]
    assert set(_figures(page)) == {"candidate", "active", "published"}
    # Backtest counts the active agreement as 0 without an active version: never drawn.
    chart = page.one("svg", **{"class": "plot by-hour"})
    assert chart.all("polyline", "active") == [] and chart.all("circle", "active") == []
    assert "active" not in chart.text.replace("candidate", "")
    assert chart.all("rect", "orders")[0].text.endswith("400 orders, candidate 99.50%")
    assert page.one("table", **{"class": "by-class"}).rows()[0][-1] == "candidate agrees"
    assert [t.attrs["id"] for t in page.all("table", "confusion")] == ["candidate_vs_policy"]
    assert page.all("table", "changed") == []
    assert page.one("h2", id="examples").text == \
        "Orders on which the candidate disagrees with the policy"
    assert "The first 1 of the 6 orders on which the candidate disagrees" in \
        page.one("p", **{"class": "note examples-count"}).text
    rows = page.one("table", **{"class": "examples"}).rows()
    assert "active" not in rows[0] and rows[1][:4] == [SCRIPT_ID, "2024-03-01 10:17:00 UTC",
                                                       "Decline", "Deliver"]


def test_a_backtest_of_nothing_says_so(nothing: dict[str, Any]) -> None:
    html = render(nothing)
    page, tree = parse(html)
    assert tree.fetching == []
    assert page.all("svg") == []
    meta = " ".join(p.text for p in page.all("p", "meta"))
    assert "source data/ & co" in meta and "the whole history" in meta
    assert page.one("span", **{"class": "scored"}).text == "0"
    assert page.one("span", **{"class": "first"}).text == "-"
    figures = _figures(page)
    assert "no published predictions" in figures["published"]
    assert figures["candidate"].endswith("no orders scored")
    notes = " ".join(p.text for p in page.all("p", "note"))
    assert "nothing to show by hour" in notes and "nothing to show by class" in notes
    assert "No order on which the candidate disagrees with the policy" in notes
    assert page.all("div", "warnings") == []


def test_a_report_made_by_backtest_renders() -> None:
    """Backtest's own report (two orders, the candidate changing one decision) renders, with
    its figures: the page follows the report's real shape."""
    result = Backtest(candidate="v2", active="v1", source="data x", from_ms=None, to_ms=None)
    at = _ms("2024-05-01 03:30:00")
    orders = OrderColumns(order_id=["a<1>", "b"], customer_id=["c", "c"], sku_code=["s", "s"],
                          zip_code=["z", "z"], timestamp_ms=np.array([at, at + 3_600_000]))
    features = FeatureBatch(np.array([3, 4]), np.array([np.nan, 5.0]),
                            np.array(["OK", "OK"], dtype=object), np.array([True, True]))
    result.add(Batch(orders, np.zeros(2, dtype=np.int32), np.arange(2)), features,
               candidate=np.array(["Decline", "Decline"], dtype=object),
               active=np.array(["Deliver", "Decline"], dtype=object),
               policy=np.array(["HoldCheckAvailability", "Decline"], dtype=object))
    page, tree = parse(render(result.as_dict()))
    assert tree.fetching == []
    figures = _figures(page)
    assert "50.00% (1 of 2 orders)" in figures["candidate"]
    assert "50.00% (1 of 2 orders)" in figures["active"]
    assert "1 (50.00% of orders)" in figures["changed"]
    bars = page.one("svg", **{"class": "plot by-hour"}).all("rect", "orders")
    assert [b.attrs["data-hour"] for b in bars] == ["2024-05-01T03:00Z", "2024-05-01T04:00Z"]
    assert page.one("table", **{"class": "changed"}).rows()[1][:3] == ["Deliver", "Decline",
                                                                        "1"]
    rows = page.one("table", **{"class": "examples"}).rows()
    assert rows[1] == ["a<1>", "2024-05-01 03:30:00 UTC", "HoldCheckAvailability", "Deliver",
                       "Decline", "3", "none", "OK", "true"]


def test_write_html_writes_the_page(report: dict[str, Any], tmp_path: Path) -> None:
    path = write_html(report, tmp_path / "reports" / "bt.html")
    assert path == tmp_path / "reports" / "bt.html"
    assert path.read_text(encoding="utf-8") == render(report)
