"""The HTML drift report renders every check as plots, from records that pass the Avro
contract, and stays a single self-contained file."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from triage.consumer.drift_monitor import report_record
from triage.consumer.drift_report import render
from triage.model import artifact
from triage.model.datagen import generate
from triage.model.drift import CHECKS, Reference, evaluate
from triage.model.features import FeatureBatch
from triage.model.orders import read_orders_csv
from triage.model.reference import ReferenceTables
from triage.schemas.codec import Codec


class _Tags(HTMLParser):
    """Counts opened and closed tags, and collects every attribute that could fetch something."""

    def __init__(self) -> None:
        super().__init__()
        self.open: dict[str, int] = {}
        self.closed: dict[str, int] = {}
        self.fetching: list[str] = []
        self.svgs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.open[tag] = self.open.get(tag, 0) + 1
        if tag == "svg":
            self.svgs.append(dict(attrs))
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("#"):
                self.fetching.append(f"{tag} {name}={value}")
        if tag in ("script", "link", "iframe", "img"):
            self.fetching.append(tag)

    def handle_endtag(self, tag: str) -> None:
        self.closed[tag] = self.closed.get(tag, 0) + 1


@pytest.fixture(scope="module")
def reports(history: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> list[dict]:
    """Windows of the training orders, then of the same orders after a zip roll-back (one with
    an unseen status), and one window too small to test; each through the Avro codec."""
    model = artifact.load(model_dir)
    reference = Reference.from_manifest(artifact.verify(model_dir))
    shifted = tmp_path_factory.mktemp("rollback")
    generate(20_000, 11, shifted, shift="zip-rollback")
    codec = Codec("drift_report")
    rng = np.random.default_rng(5)
    records = []
    for i, (data, size) in enumerate([(history, 1000), (history, 1000), (history, 120),
                                      (shifted, 1000), (shifted, 1000)]):
        orders = read_orders_csv(data / "orders.csv")
        features = orders.features(ReferenceTables.load(data))
        rows = rng.choice(len(orders), size=size, replace=False)
        window = FeatureBatch(features.order_hour_of_day[rows], features.inventory[rows],
                              features.payment_status[rows].copy(),
                              features.zip_code_available[rows])
        if i == 4:
            window.payment_status[:3] = "CHARGEBACK"
        recommendations, _ = model.predict(window)
        result = evaluate(reference, window, recommendations)
        record = report_record(result, window_id=f"w{i}", model_version=model.version,
                               opened_at_ms=1_700_000_000_000 + i * 60_000,
                               closed_at_ms=1_700_000_050_000 + i * 60_000)
        records.append(codec.decode(codec.encode(record)))
    return records


def test_the_records_say_what_happened(reports: list[dict]) -> None:
    assert [r["status"] for r in reports] == ["ok", "ok", "insufficient_data", "drift", "drift"]
    drifted = {c["name"] for c in reports[3]["checks"] if c["verdict"] == "drift"}
    assert "zip_code_available" in drifted
    payment = next(c for c in reports[4]["checks"] if c["name"] == "payment_status")
    assert payment["verdict"] == "drift" and payment["unseen"] == {"CHARGEBACK": 3}


def test_the_report_has_both_plots_for_every_check_and_nothing_to_fetch(
        reports: list[dict], tmp_path: Path) -> None:
    html = render(reports, last=10)
    (tmp_path / "report.html").write_text(html)
    tags = _Tags()
    tags.feed(html)
    assert tags.fetching == []
    for tag in ("html", "svg", "section", "table"):
        assert tags.open.get(tag) == tags.closed.get(tag), tag
    plots = {(svg["class"], svg["data-check"]) for svg in tags.svgs}
    for check in CHECKS:
        assert ("plot distribution", check) in plots, check
        assert ("plot trend", check) in plots, check
    # The latest verdicts, the statistic against its threshold, and the unseen status.
    section = re.search(r"<section class='check' id='zip_code_available'>.*?</section>", html)
    assert section and "badge drift" in section.group(0) and "threshold" in section.group(0)
    assert "CHARGEBACK" in html
    # One point per window in every trend (the insufficient window has no statistic).
    trend = re.search(r"<svg[^>]*class='plot trend' data-check='order_hour_of_day'.*?</svg>",
                      html)
    assert trend and trend.group(0).count("<circle") == 4


def test_the_report_keeps_the_last_windows_only(reports: list[dict]) -> None:
    html = render(reports, last=2)
    assert "2 window(s) shown" in html
    assert "badge ok" not in html.split("<table>")[0]  # the header names the latest: drift


def test_an_empty_topic_gives_a_page_that_says_so() -> None:
    assert "No drift reports yet" in render([])
