"""Models that change without a stop (model/registry.py, scoring/follower.py): the registry on
its own, then two workers following it on the broker while orders stream in and versions are
promoted, refused and rolled back."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_delivery import Background, outcome
from triage.bus.settings import Settings
from triage.consumer.reader import TopicReader
from triage.consumer.supervisor import Supervisor, worker_env
from triage.model import artifact
from triage.model import train as train_module
from triage.model.artifact import ArtifactError
from triage.model.orders import read_orders_csv
from triage.model.policy import label
from triage.model.registry import Registry, RegistryError
from triage.model.train import train
from triage.scoring.follower import changed, publish_state, read_state

TRIAGE = [sys.executable, "-m", "triage.cli"]


def tamper(model_dir: Path) -> None:
    """Change one byte of the model file, as a bad copy or an attacker would."""
    model_file = model_dir / artifact.read_manifest(model_dir)["model_file"]
    data = bytearray(model_file.read_bytes())
    data[-2] ^= 0x01
    model_file.write_bytes(bytes(data))


def swapped(labels: np.ndarray) -> np.ndarray:
    """The policy's labels with Deliver and HoldCheckPayment exchanged: a mislabelled history."""
    out = labels.copy()
    out[labels == "Deliver"], out[labels == "HoldCheckPayment"] = "HoldCheckPayment", "Deliver"
    return out


@pytest.fixture(scope="module")
def registry(model_dir: Path, history: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Registry, str, str, str]:
    """A registry with three versions: the session's model, one trained with another seed,
    and a bad candidate trained on mislabelled data (its recorded holdout accuracy is against
    those labels, so it passes the offline gate)."""
    root = tmp_path_factory.mktemp("registry") / "models"
    reg = Registry(root)
    v1 = reg.add(model_dir).version
    v2 = reg.add(train(history, tmp_path_factory.mktemp("v2") / "model", seed=11).model_dir
                  or "").version
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "label", lambda features: swapped(label(features)))
        bad = reg.add(train(history, tmp_path_factory.mktemp("bad") / "model", seed=5)
                      .model_dir or "").version
    assert len({v1, v2, bad}) == 3
    return reg, v1, v2, bad


def test_the_registry_adds_verified_versions_once_and_lists_only_them(
        registry: tuple[Registry, str, str], model_dir: Path, tmp_path: Path) -> None:
    reg, v1, v2, bad = registry
    assert reg.add(model_dir).version == v1  # the same artifact again: a no-op
    (reg.root / ".adding-partial").mkdir(exist_ok=True)  # a copy in progress is a dot-file
    listed = reg.versions()
    assert {v.version for v in listed} == {v1, v2, bad}
    assert all(0.99 <= v.holdout_accuracy <= 1.0 and v.created_at and v.data_sha256
               for v in listed)
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    tamper(bad)
    with pytest.raises(ArtifactError, match="changed after training"):
        reg.add(bad)
    with pytest.raises(RegistryError, match="not in the registry"):
        reg.path("xgb-000000000000")
    with pytest.raises(RegistryError, match="not a version id"):
        reg.path("../etc")


def test_a_version_copied_in_part_is_listed_with_its_problem_not_as_a_candidate(
        registry: tuple[Registry, str, str, str], tmp_path: Path) -> None:
    """Found by a new user: a version directory copied in by hand (cp -r, rsync, a volume
    being synced) and interrupted half way was listed as an ordinary candidate."""
    reg, v1, v2, bad = registry
    root = tmp_path / "models"
    mine = Registry(root)
    whole = mine.add(reg.path(v1)).version
    # v2: the manifest copied, the model file not yet.
    (root / v2).mkdir()
    shutil.copy2(reg.path(v2) / artifact.MANIFEST, root / v2)
    # bad: both files there, the model file cut half way.
    shutil.copytree(reg.path(bad), root / bad)
    model_file = root / bad / artifact.read_manifest(root / bad)["model_file"]
    model_file.write_bytes(model_file.read_bytes()[:len(model_file.read_bytes()) // 2])
    # A version's directory made, its manifest not copied yet.
    (root / "xgb-0123456789ab").mkdir()
    (root / "lost+found").mkdir()  # not a version at all

    listed = {v.version: v for v in mine.versions()}
    assert set(listed) == {whole, v2, bad, "xgb-0123456789ab"}
    assert listed[whole].complete and listed[whole].problem is None
    assert listed[v2].problem == "incomplete: model.json missing"
    assert listed[bad].problem is not None and "does not match its manifest" in \
        listed[bad].problem
    assert listed["xgb-0123456789ab"].problem == "incomplete: manifest.json missing"
    assert not any(listed[v].complete for v in (v2, bad, "xgb-0123456789ab"))
    # Promoting or shadowing one (Registry.get) is refused.
    with pytest.raises(ArtifactError, match="missing"):
        mine.get(v2)
    with pytest.raises(ArtifactError, match="changed after training"):
        mine.get(bad)
    with pytest.raises(RegistryError, match=r"incomplete: manifest\.json missing"):
        mine.get("xgb-0123456789ab")


def _fail_second_copy(real: Callable[..., Any]) -> Callable[..., Any]:
    calls = []

    def copyfile(src: str, dst: str, **kwargs: Any) -> Any:
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, **kwargs)
    return copyfile


def _corrupt_copy(real: Callable[..., Any]) -> Callable[..., Any]:
    def copyfile(src: str, dst: str, **kwargs: Any) -> Any:
        done = real(src, dst, **kwargs)
        if Path(src).name == artifact.MODEL_FILE:  # the copy differs from its source
            Path(dst).write_bytes(Path(dst).read_bytes()[:-10])
        return done
    return copyfile


def _failing_fsync(fd: int) -> None:
    raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("fault", ["copy fails half way", "copy differs", "fsync fails"])
def test_adding_a_version_that_fails_leaves_nothing_behind(
        fault: str, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registry.add copies beside, verifies the copy, writes it to disk, then renames: a
    copy that fails, comes out different, or cannot be written to disk never becomes a
    version, and leaves no directory behind."""
    root = tmp_path / "models"
    reg = Registry(root)
    with monkeypatch.context() as patch:
        if fault == "copy fails half way":
            patch.setattr(shutil, "copyfile", _fail_second_copy(shutil.copyfile))
        elif fault == "copy differs":
            patch.setattr(shutil, "copyfile", _corrupt_copy(shutil.copyfile))
        else:
            patch.setattr(os, "fsync", _failing_fsync)
        with pytest.raises((OSError, ArtifactError)):
            reg.add(model_dir)
    assert list(root.iterdir()) == []
    assert reg.versions() == []
    added = reg.add(model_dir)  # the registry is usable as before
    assert [v.version for v in reg.versions()] == [added.version]


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRIAGE, "models", *args], env=worker_env(settings),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


def test_models_compare_prints_every_class_name_whole() -> None:
    """The demo's matrix cut HoldCheckAvailability to HoldCheckAvail; compare's did too."""
    from triage.cli import report_text

    classes = ["Deliver", "HoldCheckAvailability", "HoldCheckDelivery", "HoldCheckPayment",
               "Decline"]
    text = report_text({"pairs": 5, "active": "a", "shadow": "b", "agreement": 1.0,
                        "classes": classes, "confusion": [[int(i == j) for j in range(5)]
                                                          for i in range(5)],
                        "active_policy_agreement": 1.0, "shadow_policy_agreement": 1.0})
    header = text.splitlines()[1]
    assert all(name in header.split() for name in classes)
