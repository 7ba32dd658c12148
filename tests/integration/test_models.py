"""Models that change without a stop (model/registry.py, scoring/follower.py): the registry on
its own, then two workers following it on the broker while orders stream in and versions are
promoted, refused and rolled back.

This half needs a broker or starts processes; tests/unit/test_models.py has the rest."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import TRIAGE, Background, cli, outcome, tamper
from triage.consumer.reader import TopicReader
from triage.consumer.supervisor import Supervisor, worker_env
from triage.model.orders import read_orders_csv
from triage.model.registry import Registry
from triage.scoring.follower import changed, publish_state, read_state
from triage.settings import Settings


def test_workers_swap_to_a_promoted_version_between_batches_and_refuse_a_tampered_one(
        settings: Settings, registry: tuple[Registry, str, str, str], history: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    reg, v1, v2, bad = registry
    root = str(reg.root)
    n = 20_000
    order_ids = read_orders_csv(history / "orders.csv", limit=n).order_id

    refused = cli(settings, "promote", v2, "--registry", root, "--min-accuracy", "1.01")
    assert refused.returncode == 2 and "below --min-accuracy" in refused.stderr, refused.stderr
    assert read_state(settings.connection, settings.topics) is None  # nothing written
    promoted = cli(settings, "promote", v1, "--registry", root, "--by", "test")
    assert promoted.returncode == 0, promoted.stderr
    shadowed = cli(settings, "shadow", bad, "--registry", root)  # beside every active version
    assert shadowed.returncode == 0, shadowed.stderr

    bg = Background()
    supervisor = bg.supervise(Supervisor(settings, None, history, workers=2,
                                         registry_dir=reg.root))
    try:
        supervisor.wait_until_assigned(settings.topics.orders_partitions)
        since = int(time.time() * 1000)
        bg.replay(settings, history / "orders.csv", limit=n, rate=2_000)  # 10 s of orders
        time.sleep(3.0)  # then promote v2 mid-stream, as `triage models promote` does (its own
        # process start takes seconds: the command is tested above and below)
        publish_state(settings.connection, settings.topics,
                      changed(v2, v1, "promote", "test", shadow=bad))
        switched_ms = int(time.time() * 1000)
        time.sleep(2.0)
        assert bg.replay_running()  # the switch happened mid-stream
        # A version whose model file was changed after training, promoted behind the CLI's
        # back (as a corrupted shared volume would serve it): every worker refuses it.
        shutil.copytree(reg.path(v1), reg.root / "xgb-tampered0000")
        tamper(reg.root / "xgb-tampered0000")
        publish_state(settings.connection, settings.topics,
                      changed("xgb-tampered0000", v2, "promote", "test", shadow=bad))
        bg.wait_replay()
        result = outcome(settings, order_ids, since)
    finally:
        supervisor.stop()

    result.assert_nothing_lost_and_copies_identical(order_ids)
    versions = {p["model_version"] for p in result.predictions}
    assert versions == {v1, v2}, versions  # both scored; the tampered one never
    # Per partition, by offset: version 1, then version 2, never back (a swap is between two
    # batches, and a batch is scored by one model).
    for partition in range(settings.topics.orders_partitions):
        seq = [p["model_version"] for p in sorted(
            (p for p in result.predictions if p["order_partition"] == partition),
            key=lambda p: p["order_offset"])]
        assert seq == sorted(seq, key=lambda v: v == v2), partition
    # Within 5 s of the promotion, every worker scores with the new version.
    later = [p["model_version"] for p in result.predictions
             if p["scored_at_ms"] > switched_ms + 5_000]
    assert later and set(later) == {v2}
    logs = capfd.readouterr()
    assert logs.out.count("model_refused") + logs.err.count("model_refused") >= 2  # 2 workers

    # Shadow: every order was also scored by the bad candidate, once, on the shadow topic only.
    with TopicReader(settings.connection, settings.topics.shadow_topic, "prediction") as reader:
        shadow = [p for _, p in reader.read(idle_s=3.0)]
    scored = {(p["order_partition"], p["order_offset"]): p for p in result.predictions}
    assert sorted((p["order_partition"], p["order_offset"]) for p in shadow) == sorted(scored)
    assert {p["model_version"] for p in shadow} == {bad}
    compared = cli(settings, "compare", "--registry", root, "--json", "--idle", "2")
    assert compared.returncode == 0, compared.stderr
    report = json.loads(compared.stdout)
    agreed = sum(scored[(p["order_partition"], p["order_offset"])]["recommendation"]
                 == p["recommendation"] for p in shadow)
    assert (report["shadow"], report["pairs"]) == (bad, len(shadow))
    assert report["agreement"] == pytest.approx(agreed / len(shadow))
    assert sum(map(sum, report["confusion"])) == len(shadow)
    assert report["shadow_policy_agreement"] < report["active_policy_agreement"]

    listed = cli(settings, "list", "--registry", root)
    assert listed.returncode == 0
    rows = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()[1:]
            if line.startswith("xgb-")}
    assert (rows[v1], rows[bad], rows["xgb-tampered0000"]) == ("candidate", "shadow", "active"), \
        listed.stdout
    back = cli(settings, "rollback", "--registry", root)
    assert back.returncode == 0, back.stderr
    state = read_state(settings.connection, settings.topics)
    assert state is not None and (state.active, state.previous) == (v2, "xgb-tampered0000")
    same = cli(settings, "shadow", v2, "--registry", root)
    assert same.returncode == 2 and "is the active version" in same.stderr, same.stderr
    # The gate: the bad candidate passed the offline one, but agreed with the policy less
    # often than the active version on live traffic; only --force promotes it, and says so.
    gated = cli(settings, "promote", bad, "--registry", root)
    assert gated.returncode == 2 and "less often on live traffic" in gated.stderr, gated.stderr
    forced = cli(settings, "promote", bad, "--registry", root, "--force")
    assert forced.returncode == 0, forced.stderr
    state = read_state(settings.connection, settings.topics)
    assert state is not None and (state.active, state.forced, state.shadow) == (bad, True, None)


def test_the_hints_train_and_models_list_print_run_as_printed(
        settings: Settings, model_dir: Path, tmp_path: Path) -> None:
    """Found by a new user: `train --registry R` said "`triage models promote V` makes it
    active", and run as printed that was a usage error (no --registry). Each hint now runs."""
    import re
    import shlex

    from triage.model.datagen import generate

    root = tmp_path / "models dir"  # a space, so the hints must quote it
    Registry(root).add(model_dir)
    listed = cli(settings, "list", "--registry", str(root))
    assert listed.returncode == 0, listed.stderr
    hint = re.search(r"`triage (models promote VERSION [^`]+)`", listed.stdout)
    assert hint, listed.stdout
    version = Registry(root).versions()[0].version
    promoted = cli(settings, *shlex.split(hint.group(1).replace("VERSION", version))[1:])
    assert promoted.returncode == 0, promoted.stderr[-2000:]

    generate(3_000, 5, tmp_path / "data")
    trained = subprocess.run([*TRIAGE, "train", "--data", str(tmp_path / "data"),
                              "--registry", str(root)], env=worker_env(settings),
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    hint = re.search(r"`triage (models promote [^`]+)`", trained.stdout)
    assert hint, trained.stdout
    promoted = cli(settings, *shlex.split(hint.group(1))[1:])
    assert promoted.returncode == 0, promoted.stderr[-2000:]


def test_models_list_shows_a_half_copied_version_as_unusable_with_its_problem(
        settings: Settings, model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    whole = Registry(root).add(model_dir).version
    half = "xgb-0123456789ab"
    (root / half).mkdir()  # its manifest not copied yet
    listed = cli(settings, "list", "--registry", str(root))
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]
            if line.startswith("xgb-")}
    assert "candidate" in rows[whole]
    assert "unusable" in rows[half] and "incomplete: manifest.json missing" in rows[half]
    assert "candidate" not in rows[half]
