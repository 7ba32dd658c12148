"""Backtests from Kafka (consumer/backtest.py, `triage models backtest`): after a worker scored
a replayed week live, a backtest of the same version over what the topics hold gives every
order merge_asof's features, agrees with what was published, changes no topic's offsets or
contents and no group's committed offsets, and lets `promote --require-backtest` through,
recording the report's id; one that does not pass is refused."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import cli, predictions
from triage.bus.offsets import committed_offsets, watermarks
from triage.consumer import backtest as bt
from triage.consumer.supervisor import Supervisor
from triage.model import artifact
from triage.model.features import FEATURE_NAMES, WINDOWED_NAMES
from triage.model.registry import Registry
from triage.producer.replay import replay
from triage.scoring import feed as feed_module
from triage.scoring.follower import read_state
from triage.settings import Settings


def offsets(settings: Settings) -> dict[str, object]:
    """Every topic's (earliest, end) offsets per partition, and the scorer group's commits."""
    topics = settings.topics
    names = [topics.orders_topic, topics.predictions_topic, topics.drift_topic,
             topics.dlq_topic, topics.shadow_topic, topics.models_topic,
             *(topics.topic_of(s) for s in ("inventory", "payments", "zip_codes"))]
    found: dict[str, object] = {name: watermarks(settings.connection, name) for name in names}
    found["committed"] = committed_offsets(settings.connection, settings.scorer.group_id,
                                           topics.orders_topic)
    return found


def test_a_backtest_from_kafka_joins_as_the_workers_do_and_touches_nothing(
        settings: Settings, live_data: Path, model_dir: Path, expected: dict,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings.replace(reference_max_wait_ms=60_000)
    supervisor = Supervisor(settings, model_dir, None, workers=1)
    supervisor.start()
    threading.Thread(target=supervisor.run, daemon=True).start()
    supervisor.wait_until_assigned(settings.topics.orders_partitions)
    try:
        since = int(time.time() * 1000)
        replay(settings, live_data, progress=False)
        published = predictions(settings, set(expected), since)
    finally:
        supervisor.stop()
    assert len(published) == len(expected)
    before = offsets(settings)

    # The library: every order of the topic, with merge_asof's features, even where the
    # workers would trim their tables (TRIAGE_REFERENCE_RETENTION, here after every record).
    model = artifact.load(model_dir)
    monkeypatch.setattr(feed_module, "_RETAIN_EVERY", 1)
    history = bt.kafka_history(settings.replace(reference_retention="1s"), batch=400)
    assert not history.warnings
    seen: dict[str, dict] = {}

    def note(batch: bt.Batch, features: object, _: np.ndarray) -> None:
        for row, order_id in enumerate(batch.orders.order_id):
            seen[order_id] = {name: features.columns[name][row]  # type: ignore[attr-defined]
                              for name in FEATURE_NAMES if name not in WINDOWED_NAMES}

    result = bt.run(model, None, history.tables, history.batches,
                    bt.Backtest(model.version, None, "kafka", None, None),
                    published=history.published, on_batch=note)
    assert set(seen) == set(expected)
    for order_id, want in expected.items():
        got = seen[order_id]
        inventory = got["inventory"]
        assert {**got, "inventory": None if np.isnan(inventory) else float(inventory),
                "order_hour_of_day": int(got["order_hour_of_day"]),
                "zip_code_available": bool(got["zip_code_available"]),
                **dict.fromkeys(WINDOWED_NAMES)} == want, order_id  # the model reads none
    assert result.published_orders == len(expected)
    assert result.published_agreement == len(expected)  # the same model decided the same

    # The command: a report, kept in the registry, that promotion can require.
    registry = Registry(tmp_path / "models")
    version = registry.add(model_dir).version
    done = cli(settings, "backtest", version, "--registry", str(registry.root),
               "--out", str(tmp_path / "reports"), "--min-agreement", "0.5")
    assert done.returncode == 0, done.stderr
    assert "agreement with the policy: " in done.stdout
    assert "passes the promotion gate" in done.stdout
    report = registry.latest_backtest(version)
    assert report is not None and report["orders"] == len(expected)
    assert json.loads((tmp_path / "reports" / f"{report['id']}.json").read_text()) == report
    assert (tmp_path / "reports" / f"{report['id']}.html").is_file()
    assert offsets(settings) == before  # nothing published, nothing committed

    refused = cli(settings, "promote", version, "--registry", str(registry.root),
                  "--require-backtest", "--min-agreement", "1.01")
    assert refused.returncode == 2 and "below --min-agreement" in refused.stderr
    promoted = cli(settings, "promote", version, "--registry", str(registry.root),
                   "--require-backtest", "--min-agreement", "0.5")
    assert promoted.returncode == 0, promoted.stderr
    state = read_state(settings.connection, settings.topics)
    assert state is not None and state.active == version and state.backtest == report["id"]

    # No control topic, a reference topic missing: the policy alone, and a warning that says so.
    elsewhere = settings.replace(models_topic=f"{settings.topics.models_topic}-none",
                                 inventory_topic=f"{settings.topics.topic_of('inventory')}-none")
    alone = cli(elsewhere, "backtest", version, "--registry", str(registry.root),
                "--out", str(tmp_path / "reports"))
    assert alone.returncode == 0, alone.stderr
    assert "compared with the policy alone" in alone.stderr
    assert "(active " not in alone.stdout
    assert f"warning: reference topic {settings.topics.topic_of('inventory')}-none does not " \
           "exist" in alone.stdout
