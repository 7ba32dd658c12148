"""The HTML drift report renders every check as plots, from records that pass the Avro
contract, and stays a single self-contained file; it states what the reports saw (the workers'
sampling rate, each window's orders in event time), places trends on the windows' times, and
explains a zip alarm that a roll-out causes by design."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from triage.consumer.drift_monitor import _Window, report_record
from triage.consumer.drift_report import open_window_note, render
from triage.model import artifact
from triage.model.datagen import generate
from triage.model.drift import CHECKS, Reference, evaluate
from triage.model.features import FEATURE_NAMES, FeatureBatch
from triage.model.orders import read_orders_csv
from triage.model.reference import ReferenceTables
from triage.schemas.codec import Codec
from triage.scoring.core import CoreConfig, Incoming, ScoringCore
from triage.scoring.sampling import sampled_indices
from triage.scoring.validation import OrderValidator
from triage.settings import Settings


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


WORKERS_RATE = 0.2  # the rate the "workers" sampled at; the report command's default is 0.05
CLOSED_MS = 1_700_000_050_000


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
        rows = rng.choice(len(orders), size=size, replace=False)  # spread over all of time
        window = FeatureBatch(features.order_hour_of_day[rows], features.inventory[rows],
                              features.payment_status[rows].copy(),
                              features.zip_code_available[rows])
        if i == 4:
            window.payment_status[:3] = "CHARGEBACK"
        recommendations, _ = model.predict(window)
        result = evaluate(reference, window, recommendations)
        record = report_record(result, window_id=f"w{i}", model_version=model.version,
                               opened_at_ms=1_700_000_000_000 + i * 60_000,
                               closed_at_ms=1_700_000_050_000 + i * 60_000,
                               order_at_ms=orders.timestamp_ms[rows].tolist(),
                               sample_rates=[WORKERS_RATE] * size, window_samples=1000)
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


@pytest.fixture(scope="module")
def replay(history: Path, model_dir: Path) -> list[dict]:
    """The README's own-data flow: the training orders replayed in event time, sampled at 20%,
    cut into windows of 1,000 consecutive samples, all closed within two seconds (a replay is
    fast); through the Avro codec."""
    model = artifact.load(model_dir)
    reference = Reference.from_manifest(artifact.verify(model_dir))
    orders = read_orders_csv(history / "orders.csv")
    features = orders.features(ReferenceTables.load(history))
    sampled = np.array(sampled_indices(orders.order_id, WORKERS_RATE))
    in_time = sampled[np.argsort(orders.timestamp_ms[sampled], kind="stable")]
    codec = Codec("drift_report")
    records = []
    for i in range(len(in_time) // 1000):
        rows = in_time[i * 1000:(i + 1) * 1000]
        window = features.take(rows)
        recommendations, _ = model.predict(window)
        record = report_record(
            evaluate(reference, window, recommendations), window_id=f"r{i}",
            model_version=model.version, opened_at_ms=CLOSED_MS + 500 * i - 500,
            closed_at_ms=CLOSED_MS + 500 * i, order_at_ms=orders.timestamp_ms[rows].tolist(),
            sample_rates=[WORKERS_RATE] * len(rows), window_samples=1000)
        records.append(codec.decode(codec.encode(record)))
    return records


def _utc(text: str, fmt: str) -> datetime:
    return datetime.strptime(text, fmt).replace(tzinfo=UTC)


def _ticks(html: str, check: str) -> list[str]:
    trend = re.search(rf"<svg[^>]*class='plot trend' data-check='{check}'.*?</svg>", html)
    assert trend
    return re.findall(r"<text class='tick'[^>]*>([^<]*)</text>", trend.group(0))


def test_the_page_states_the_workers_sampling_rate_not_this_commands(
        reports: list[dict]) -> None:
    """The workers sampled at 20%; the report command runs with the default 5%."""
    command = Settings()
    assert command.core.sample_rate != WORKERS_RATE
    html = render(reports)
    meta = html.split("</p>")[0]
    assert "sampled at 20%" in meta and "5%" not in meta
    windows = re.search(r"<section id='windows'>.*?</section>", html)
    assert windows and windows.group(0).count("<td>20%</td>") == len(reports)
    note = open_window_note(40, command, reports)
    assert "sampled 20% of orders" in note and "5%" not in note
    assert "TRIAGE_SAMPLE_RATE" not in note
    # What closes the window comes from the monitor's report too, not this command.
    assert "closes at 1,000 samples, as the monitor reported" in open_window_note(
        40, command.replace(drift_window_samples=5000), reports)


def test_without_a_report_the_note_claims_no_sampling_rate() -> None:
    note = open_window_note(40, Settings(), [])
    assert "40 sample(s)" in note and "closes at 1,000 samples" in note
    assert "%" not in note and "this command's settings" in note


def test_reports_and_samples_of_the_earlier_contracts_still_decode_and_render(
        reports: list[dict]) -> None:
    """Schema evolution: version 2 of drift_sample added sample_rate, of drift_report the order
    times, the sampling rates and the window settings, each with a default; records written
    before decode with the defaults, and the page says the rate was not recorded."""
    old_report = {k: v for k, v in reports[0].items()
                  if k not in ("first_order_at_ms", "last_order_at_ms", "sample_rates",
                               "window_samples", "window_minutes")}
    data = Codec("history/drift_report.1").encode(old_report)
    decoded = Codec("drift_report").decode(data)
    assert decoded["sample_rates"] == [] and decoded["first_order_at_ms"] is None
    html = render([decoded])
    assert "sampled at not recorded" in html
    assert "do not record the workers' sampling rate" in open_window_note(0, Settings(),
                                                                          [decoded])
    sample = {"order": {"order_id": "O-1", "customer_id": "C", "timestamp_ms": 5,
                        "sku_code": "S", "zip_code": "1"},
              "features": {"order_hour_of_day": 1, "inventory": 1.0, "payment_status": "OK",
                           "zip_code_available": True},
              "recommendation": "Deliver", "probabilities": {}, "model_version": "v",
              "scored_at_ms": 0}
    assert Codec("drift_sample").decode(
        Codec("history/drift_sample.1").encode(sample))["sample_rate"] is None


def test_the_scorer_puts_its_sampling_rate_on_every_sample(history: Path,
                                                           model_dir: Path) -> None:
    orders = read_orders_csv(history / "orders.csv", limit=400).records()
    core = ScoringCore(artifact.load(model_dir), ReferenceTables.load(history), Codec("order"),
                       config=CoreConfig(sample_rate=WORKERS_RATE),
                       checks=[OrderValidator(Settings().validation)])
    outcome = core.process([Incoming(o) for o in orders])
    assert len(outcome.samples) == len(sampled_indices([o["order_id"] for o in orders],
                                                       WORKERS_RATE)) > 0
    codec = Codec("drift_sample")
    assert {codec.decode(codec.encode(s.record))["sample_rate"] for s in outcome.samples} == {
        WORKERS_RATE}


def test_the_monitor_reports_the_rates_and_order_times_of_its_window() -> None:
    """Two workers at different rates, and one sample from before rates were carried."""
    window = _Window(opened_at_ms=0, opened_mono=0.0)
    rates = [0.2, 0.2, 0.05, None, 0.2]
    order_times = [3_000, 1_000, 9_000, 4_000, 2_000]
    for offset, (rate, at) in enumerate(zip(rates, order_times, strict=True)):
        message = SimpleNamespace(topic=lambda: "drift", partition=lambda o=offset: o % 2,
                                  offset=lambda o=offset: o, timestamp=lambda: (1, 0))
        window.add(message, {
            "order": {"timestamp_ms": at}, "sample_rate": rate, "recommendation": "Deliver",
            "scored_at_ms": 50_000 + offset, "model_version": "v",
            "features": dict.fromkeys(FEATURE_NAMES)})
    window.drop_partitions({1})  # offsets 1 and 3 go to another monitor
    result = SimpleNamespace(status="ok", samples=len(window), min_samples=1, alpha=0.01,
                             checks=[])
    record = report_record(result, window_id="w", model_version="v", opened_at_ms=0,
                           closed_at_ms=1, order_at_ms=window.order_at,
                           sample_rates=window.rates)
    assert record["sample_rates"] == [{"rate": 0.05, "samples": 1},
                                      {"rate": 0.2, "samples": 2}]
    assert (record["first_order_at_ms"], record["last_order_at_ms"]) == (2_000, 9_000)
    assert Codec("drift_report").decode(Codec("drift_report").encode(record))[
        "sample_rates"] == record["sample_rates"]


def test_trends_are_labelled_with_the_windows_close_times(reports: list[dict]) -> None:
    """Windows of orders spread over the whole period: placed by when each closed."""
    html = render(reports)
    ticks = _ticks(html, "zip_code_available")
    assert "latest" not in ticks and not any(t.startswith("-") for t in ticks)
    closed = [datetime.fromtimestamp(r["closed_at_ms"] / 1000, UTC).replace(second=0)
              for r in reports]
    assert [_utc(t, "%m-%d %H:%M").replace(year=closed[0].year) for t in ticks] == closed
    assert "window closed (UTC)" in html


def test_trends_of_an_event_time_replay_are_labelled_with_the_order_times(
        replay: list[dict]) -> None:
    """Windows closed within two seconds but spanning days of orders: placed by the latest
    order of each, and the windows table gives each one's span."""
    html = render(replay)
    assert "latest order in each window (event time, UTC)" in html
    ticks = _ticks(html, "order_hour_of_day")
    last = [datetime.fromtimestamp(r["last_order_at_ms"] / 1000, UTC).replace(second=0)
            for r in replay]
    assert [_utc(t, "%m-%d %H:%M").replace(year=last[0].year) for t in ticks] == last
    windows = re.search(r"<section id='windows'>.*?</section>", html)
    assert windows
    rows = re.findall(r"<tr><td>[^<]*</td><td>([^<]*)</td><td class='num'>([^<]*)</td>"
                      r"<td>([^<]*)</td><td>([^<]*)</td>", windows.group(0))
    fmt = "%Y-%m-%d %H:%M:%S UTC"
    assert [(int(n.replace(",", "")), _utc(a, fmt), _utc(b, fmt)) for _, n, a, b in rows] == [
        (r["samples"],
         datetime.fromtimestamp(r["first_order_at_ms"] // 1000, UTC),
         datetime.fromtimestamp(r["last_order_at_ms"] // 1000, UTC)) for r in replay]


def _zip(report: dict) -> dict:
    return next(c for c in report["checks"] if c["name"] == "zip_code_available")


def test_a_zip_alarm_of_an_event_time_replay_is_explained_where_it_shows(
        replay: list[dict]) -> None:
    """The first window of the replay holds the earliest orders, before most zips rolled out:
    fewer available than the training average, and the check alarms. The note says why, with
    the window's figures, how to tell it from drift and what to do; no other check has it."""
    first = replay[0]
    available = next(b for b in _zip(first)["bins"] if b["label"] == "available")
    assert _zip(first)["verdict"] == "drift" and available["current"] < available["baseline"]
    html = render(replay[:1])
    section = re.search(r"<section class='check' id='zip_code_available'>.*?</section>", html)
    assert section
    note = re.search(r"<div class='note rollout'[^>]*>(.*?)</div>", section.group(0))
    assert note
    text = re.sub(r"<[^>]+>", "", note.group(1))
    assert "roll-out shifts this check by design" in text
    assert f"available in {available['current']:.1%}" in text
    assert f"against {available['baseline']:.1%} in training: below the baseline" in text
    start = datetime.fromtimestamp(first["first_order_at_ms"] / 1000, UTC)
    assert start.strftime("%Y-%m-%d %H:%M:%S") in text
    assert "Roll-out or drift?" in text and "What to do:" in text
    assert html.count("class='note rollout'") == 1
    assert "href='#rollout-zip_code_available'" in html  # from the summary table


def test_no_roll_out_note_where_the_zip_check_does_not_alarm(replay: list[dict]) -> None:
    assert _zip(replay[-1])["verdict"] == "ok"
    html = render(replay)  # the latest window is pictured: no zip alarm in it
    assert "class='note rollout'" not in html and "href='#rollout-" not in html
