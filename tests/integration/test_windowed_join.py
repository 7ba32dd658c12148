"""Windowed features from the feature stage to the prediction, on a real broker: a model
trained with windowed features (computed offline by ``train --windowed``), two scorer workers
(one SIGKILLed mid-stream and restarted by its supervisor, a rebalance each way) and a
``triage windows`` instance. Every order's last revision carries the windowed values of
model/windows.py's offline computation over the orders published; a first prediction that
differs says so (``windowed_unknown``) or is followed by a correction. Then model_v2 in shadow
beside model_v1 through the registry, on data with customer bursts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.helpers import TRIAGE, clean_env, cli, last, predictions, wait_for
from tests.integration.test_window_stage import (
    Outputs,
    expected_values,
    histories,
    out_of_order,
    publish,
    stage_settings,
)
from triage.consumer.reader import collect
from triage.consumer.supervisor import Supervisor
from triage.model.datagen import generate
from triage.model.features import FEATURE_NAMES, WINDOWED_NAMES, FeatureBatch
from triage.model.orders import read_orders_csv
from triage.model.policy import BURST_ORDERS_1H, label_v2
from triage.model.registry import Registry
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


def test_model_v2_declines_bursts_in_shadow_beside_model_v1(
        settings: Settings, tmp_path: Path) -> None:
    """model_v2 (policy v2 on the four features and the windowed ones) in shadow through the
    registry, model_v1 active, on data with customer bursts: the workers join the stage's
    answers because the shadow reads them; every order gets both predictions; the shadow
    declines the bursts v1 delivers, as policy v2 says, on the stage's values; `triage models
    compare` judges both by the shadow's policy (v2), and the live gate lets model_v2 be
    promoted (model_v1 follows policy v1, not v2)."""
    settings = stage_settings(settings).replace(reference_max_wait_ms=60_000)
    data = tmp_path / "data"
    generate(2_000, 41, data, weeks=1, shift="customer-bursts")
    records = read_orders_csv(data / "orders.csv").records()
    registry = Registry(tmp_path / "models")
    train(data, tmp_path / "v1", min_accuracy=0.0)
    train(data, tmp_path / "v2", windowed=WINDOWED_NAMES, policy="v2", min_accuracy=0.0)
    v1, v2 = registry.add(tmp_path / "v1").version, registry.add(tmp_path / "v2").version
    root = str(registry.root)
    for args in (("promote", v1, "--registry", root, "--by", "test"),
                 ("shadow", v2, "--registry", root)):
        done = cli(settings, *args)
        assert done.returncode == 0, done.stderr
    env = clean_env(tmp_path, **{**settings.to_env(), "TRIAGE_LOG_FORMAT": "json"})
    stage = subprocess.Popen([*TRIAGE, "windows"], env=env,
                             stdout=(tmp_path / "stage.log").open("wb"),
                             stderr=subprocess.STDOUT)
    supervisor = Supervisor(settings, None, data, workers=2, registry_dir=registry.root)
    supervisor.start()
    threading.Thread(target=supervisor.run, daemon=True).start()
    ids = {r["order_id"] for r in records}
    try:
        supervisor.wait_until_assigned(settings.topics.orders_partitions)
        since = int(time.time() * 1000)
        publish(settings, records)
        found = predictions(settings, ids, since)
        shadow = collect(settings.connection, settings.topics.shadow_topic, "prediction", ids,
                         timeout_s=120, since_ms=since)
    finally:
        supervisor.stop()
        stage.terminate()
        stage.wait(30)
    offline = read_orders_csv(data / "orders.csv").windowed_values(["customer_orders_1h"])
    bursts = {r["order_id"] for r, n in zip(records, offline["customer_orders_1h"], strict=True)
              if n >= BURST_ORDERS_1H}
    assert len(bursts) >= 5  # the scenario made some
    active = {o: last(p) for o, p in found.items()}
    seen = {o: p[0] for o, p in shadow.items()}
    assert {p["model_version"] for p in active.values()} == {v1}
    assert {p["model_version"] for p in seen.values()} == {v2}
    for order_id in bursts:  # the shadow scored them on the stage's values
        assert seen[order_id]["features"]["customer_orders_1h"] >= BURST_ORDERS_1H
    delivered = [o for o in bursts if active[o]["recommendation"] == "Deliver"]
    assert delivered and all(seen[o]["recommendation"] == "Decline" for o in delivered)
    v2_policy = label_v2(FeatureBatch.from_values(
        {name: [p["features"][name] for p in seen.values()] for name in FEATURE_NAMES}))
    agreed = sum(p["recommendation"] == want for p, want in zip(seen.values(), v2_policy,
                                                                  strict=True))
    assert agreed / len(seen) >= 0.995
    compared = cli(settings, "compare", "--registry", root, "--json", "--idle", "2")
    assert compared.returncode == 0, compared.stderr
    report = json.loads(compared.stdout)
    assert report["policy"] == "v2" and report["pairs"] == len(seen)
    assert report["shadow_policy_agreement"] > report["active_policy_agreement"]
    promoted = cli(settings, "promote", v2, "--registry", root, "--by", "test")
    assert promoted.returncode == 0, promoted.stderr
    assert "agreed with policy v2" in promoted.stdout
