"""Windowed features from the feature stage to the prediction, on a real broker: a model
trained with windowed features (computed offline by ``train --windowed``), two scorer workers
(one SIGKILLed mid-stream and restarted by its supervisor, a rebalance each way) and a
``triage windows`` instance. Every order's last revision carries the windowed values of
model/windows.py's offline computation over the orders published; a first prediction that
differs says so (``windowed_unknown``) or is followed by a correction."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.helpers import TRIAGE, clean_env, last, predictions, wait_for
from tests.integration.test_window_stage import (
    Outputs,
    expected_values,
    histories,
    out_of_order,
    publish,
    stage_settings,
)
from triage.consumer.supervisor import Supervisor
from triage.model.features import WINDOWED_NAMES
from triage.model.train import train
from triage.model.windows import WINDOWED_FEATURES
from triage.settings import Settings


def test_every_prediction_carries_the_offline_windowed_values_under_a_worker_kill(
        settings: Settings, tmp_path: Path) -> None:
    settings = stage_settings(settings).replace(reference_max_wait_ms=60_000)
    records = histories(tmp_path)  # the generated history's CSVs are in tmp_path
    model_dir = tmp_path / "model"
    train(tmp_path, model_dir, windowed=WINDOWED_NAMES, min_accuracy=0.0)
    expected = expected_values(records)
    shuffled = out_of_order(records)
    env = clean_env(tmp_path, **{**settings.to_env(), "TRIAGE_LOG_FORMAT": "json"})
    stage = subprocess.Popen([*TRIAGE, "windows"], env=env,
                             stdout=(tmp_path / "stage.log").open("wb"),
                             stderr=subprocess.STDOUT)
    supervisor = Supervisor(settings, model_dir, tmp_path, workers=2)
    supervisor.start()
    threading.Thread(target=supervisor.run, daemon=True).start()
    outputs = Outputs(settings)
    try:
        supervisor.wait_until_assigned(settings.topics.orders_partitions)
        since = int(time.time() * 1000)
        half = len(shuffled) // 2
        publish(settings, shuffled[:half])

        def stage_answered_some() -> bool:
            outputs.read()
            return outputs.records >= 100

        wait_for("the stage's first answers", stage_answered_some, stage, 120)
        os.kill(supervisor.pids()[0], signal.SIGKILL)  # mid-stream; the supervisor restarts it
        publish(settings, shuffled[half:])
        found = predictions(settings, {r["order_id"] for r in records}, since)
    finally:
        supervisor.stop()
        stage.terminate()
        stage.wait(30)
        outputs.consumer.close()
    assert supervisor.restarts >= 1
    by_order = {r["order_id"]: r for r in records}
    wrong, silent = [], []
    for order_id, published in found.items():
        order = by_order[order_id]
        want: dict[str, float | None] = {}
        for feature in WINDOWED_FEATURES:
            key = (order_id, feature.entity, order[feature.entity] or "")
            want[feature.name] = expected[key][feature.name]
        final = last(published)
        got = {name: final["features"][name] for name in WINDOWED_NAMES}
        if got != want or final["windowed_unknown"]:
            wrong.append((order_id, got, want, final["windowed_unknown"]))
        first = published[0]
        if {n: first["features"][n] for n in WINDOWED_NAMES} != want \
                and not first["windowed_unknown"] and final["revision"] == 1:
            silent.append(order_id)
    assert not wrong, f"{len(wrong)} of {len(found)} differ from offline: {wrong[:3]}"
    assert not silent, f"{len(silent)} first predictions differ with no flag: {silent[:3]}"
    # The data exercise them: counts above 1, gaps measured.
    assert max(last(order)["features"]["customer_zip_codes_7d"] for order in found.values()) > 1
    assert any(last(order)["features"]["customer_seconds_since_last"] is not None
               for order in found.values())
