"""Models that change without a stop (model/registry.py, scoring/follower.py): the registry on
its own, then two workers following it on the broker while orders stream in and versions are
promoted, refused and rolled back.

This half needs no broker and starts no process; tests/integration/test_models.py has the rest."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import tamper
from triage.model import artifact
from triage.model.artifact import ArtifactError
from triage.model.registry import Registry, RegistryError


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
