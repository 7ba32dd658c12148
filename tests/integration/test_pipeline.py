"""End to end on a real broker: replay 5,000 orders through 2 worker processes, then check the
predictions, the drift samples and the committed offsets after a SIGTERM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition

from tests.helpers import SettingsFactory
from triage.bus.clients import make_consumer
from triage.consumer.reader import TopicReader, collect
from triage.consumer.supervisor import Supervisor
from triage.model import artifact
from triage.model.orders import read_orders_csv
from triage.model.reference import ReferenceTables
from triage.producer.replay import ReplaySummary, replay
from triage.settings import Settings

ORDERS = 5_000
SAMPLE_RATE = 0.05


@dataclass
class Run:
    settings: Settings
    order_ids: list[str]
    replayed: ReplaySummary
    predictions: dict[str, list[dict]]
    drift: list[dict]
    exit_codes: dict[str, int | None]


@pytest.fixture(scope="module")
def run(fresh_settings: SettingsFactory, history: Path, model_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Run:
    settings = fresh_settings(tmp_path_factory.mktemp("pipeline"))
    settings = settings.replace(sample_rate=SAMPLE_RATE, batch_size=200)
    supervisor = Supervisor(settings, model_dir, history, workers=2)
    supervisor.start()
    try:
        supervisor.wait_until_assigned(settings.topics.orders_partitions)
        started_ms = int(time.time() * 1000)
        replayed = replay(settings, history / "orders.csv", limit=ORDERS, progress=False)
        order_ids = read_orders_csv(history / "orders.csv", limit=ORDERS).order_id
        predictions = collect(settings.connection, settings.topics.predictions_topic, "prediction",
                              set(order_ids),
                              timeout_s=120, since_ms=started_ms)
    finally:
        exit_codes = supervisor.stop()
    with TopicReader(settings.connection, settings.topics.drift_topic, "drift_sample") as reader:
        drift = [record for _, record in reader.read(idle_s=3.0)]
    return Run(settings, order_ids, replayed, predictions, drift, exit_codes)


def test_every_replayed_order_gets_exactly_the_offline_prediction(run: Run, history: Path,
                                                                  model_dir: Path) -> None:
    assert run.replayed.sent == ORDERS and run.replayed.failed == 0
    assert set(run.predictions) == set(run.order_ids)

    model = artifact.load(model_dir)
    orders = read_orders_csv(history / "orders.csv", limit=ORDERS)
    expected, proba = model.predict(orders.features(ReferenceTables.load(history)))
    for order_id, recommendation, row in zip(orders.order_id, expected, proba, strict=True):
        first = run.predictions[order_id][0]
        assert first["recommendation"] == recommendation, order_id
        assert [first["probabilities"][c] for c in model.classes] == row.tolist(), order_id
        assert first["model_version"] == model.version


def test_duplicates_if_any_are_identical(run: Run) -> None:
    for records in run.predictions.values():
        content = [{k: v for k, v in r.items() if k != "scored_at_ms"} for r in records]
        assert all(c == content[0] for c in content)


def test_drift_samples_are_exactly_the_hashed_subset(run: Run) -> None:
    def fraction(order_id: str) -> float:  # scoring/sampling.py's definition
        return zlib.crc32(order_id.encode()) / 2**32

    expected = {o for o in run.order_ids if fraction(o) < SAMPLE_RATE}
    sampled = {s["order"]["order_id"] for s in run.drift}
    assert sampled == expected
    assert 0.03 * ORDERS < len(expected) < 0.07 * ORDERS
    for sample in run.drift:
        prediction = run.predictions[sample["order"]["order_id"]][0]
        assert sample["features"] == prediction["features"]
        assert sample["recommendation"] == prediction["recommendation"]


def test_after_sigterm_committed_offsets_are_at_the_end_of_each_partition(run: Run) -> None:
    assert run.exit_codes == {"0": 0, "1": 0}
    consumer = make_consumer(run.settings.connection, run.settings.scorer.group_id)
    try:
        committed = consumer.committed(
            [TopicPartition(run.settings.topics.orders_topic, p) for p in run.replayed.end_offsets],
            timeout=10)
    finally:
        consumer.close()
    # End offsets come from the producer's delivery reports, not from ListOffsets, because the
    # embedded broker answers ListOffsets(latest) with the last batch's base offset + 1.
    assert {tp.partition: tp.offset for tp in committed} == run.replayed.end_offsets
    assert sum(run.replayed.end_offsets.values()) == ORDERS


def test_predictions_command_writes_every_prediction_as_json_lines(run: Run,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "predictions.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update({**run.settings.to_env(), "TRIAGE_LOG_FORMAT": "json"})
    result = subprocess.run([sys.executable, "-m", "triage.cli", "predictions", "--idle", "2",
                             "--out", str(out)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == sum(len(records) for records in run.predictions.values())
    assert {p["order_id"] for p in written} == set(run.order_ids)
    assert f"{len(written):,} predictions of {len(set(run.order_ids)):,} orders written to " \
        f"{out}: " in result.stderr  # the per-class summary, on stderr
