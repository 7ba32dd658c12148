"""The model registry: a directory any worker on any machine can read (local, or a volume shared
by compose services or Kubernetes pods), holding one subdirectory per model version, named by
its version id (``xgb-<hash>``, from the artifact's manifest), each a verified artifact
(model/artifact.py). Beside them, ``backtests/<version>/`` keeps the versions' backtest
reports (consumer/backtest.py); anything else in the directory is a dot-file (a version being
added is copied to ``.adding-<id>``, checked against its manifest, written to disk (fsync) and
only then renamed into place, so a reader never sees half of one, even after a crash); a
directory without a readable manifest and without a version's name (``backtests``,
``lost+found`` on a mounted volume) is not listed.

A version copied in by other means (``cp -r``, rsync, a volume being synced) can be seen half
way: :meth:`Registry.versions` lists it with its ``problem`` ("incomplete: model.json
missing", "model.json does not match its manifest ...") instead of as a candidate, and
:meth:`Registry.get` (what promoting and shadowing call) refuses it.

The registry holds versions; which one is active, which one runs in shadow and who changed it
when live on the control topic (scoring/follower.py), so that every worker agrees on them.

The rules for changing them are here too, as pure functions of figures a caller has read (no
broker, no files): the promotion gates (:func:`check_accuracy`, :func:`check_live`), each
raising :class:`PromotionRefused` unless forced and returning whether it was forced, and the
rules of the state (:func:`check_shadow`, :func:`check_rollback`), raising
:class:`ChangeRefused`. ``triage models`` reads the figures, calls them and prints.

A version's metadata is its manifest's: ``created_at`` (UTC), ``metrics.holdout_accuracy``
(against the policy, on the training run's holdout), ``training.data_sha256`` (of each
training CSV).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from triage.bus.errors import ConfigurationError
from triage.model import artifact


class RegistryError(ConfigurationError):
    """The registry directory, or a version asked for, is not there or not usable."""


class PromotionRefused(ConfigurationError):
    """A promotion gate refused a version: its holdout accuracy is below the minimum
    (``gate`` "min_accuracy"), it agreed with the policy on live traffic less often than the
    active version (``gate`` "live"), or it has no passed backtest where one is required
    (``gate`` "backtest"). ``--force`` overrides a gate (the new state records it as
    forced). A ConfigurationError (bus/errors.py): the command exits with status 2, and running
    it again refuses again until the version, the figures or the flags change."""

    def __init__(self, gate: str, message: str) -> None:
        super().__init__(message)
        self.gate = gate


class ChangeRefused(ConfigurationError):
    """A shadow or rollback that the current state does not allow (no version is active yet,
    the version is the active one, nothing to roll back to); ``--force`` does not override it.
    A ConfigurationError (bus/errors.py): the command exits with status 2."""


@dataclass(frozen=True)
class Version:
    """One version in the registry, described by its manifest."""

    version: str
    path: Path
    created_at: str             # ISO 8601, UTC
    holdout_accuracy: float     # 0..1, against the policy
    data_sha256: dict[str, str]  # training CSV name -> sha256
    # None: every file its manifest lists is there with its sha256. Else why it cannot be
    # served: a copy not finished ("incomplete: model.json missing") or a changed file.
    problem: str | None = None
    policy: str = "v1"  # the policy it was trained on (model/policy.py; v1 before it was kept)

    @property
    def complete(self) -> bool:
        """Whether the version is whole and unchanged (no :attr:`problem`)."""
        return self.problem is None

    @classmethod
    def of(cls, path: Path, manifest: dict[str, Any]) -> Version:
        """The version in directory ``path``: its id is the directory's name (what the control
        topic names), which :meth:`Registry.add` makes the manifest's version."""
        return cls(path.name, path, manifest.get("created_at", ""),
                   float(manifest.get("metrics", {}).get("holdout_accuracy", float("nan"))),
                   dict(manifest.get("training", {}).get("data_sha256", {})),
                   policy=str(manifest.get("policy", "v1")))


class Registry:
    """The versions under ``root`` (created by :meth:`add` if missing)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def add(self, model_dir: str | Path) -> Version:
        """Copy the verified artifact in ``model_dir`` in as a new version; returns it. Adding
        the same version again is a no-op. Atomic: the copy is made beside (a dot-directory),
        verified, synced to disk, then renamed to the version's name; a failure removes it,
        and a crash leaves at most a dot-directory, which is never listed. Raises ArtifactError
        if the artifact (or its copy) does not verify, RegistryError if a different artifact
        already has its version id, OSError if the copy cannot be written."""
        manifest = artifact.verify(model_dir)
        version = manifest["version"]
        target = self.root / version
        if target.exists():
            if artifact.read_manifest(target)["files"] != manifest["files"]:
                raise RegistryError(f"{target} holds another artifact with version {version}")
            return Version.of(target, manifest)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".adding-{version}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(model_dir, staging, copy_function=_copy_durably)
            artifact.verify(staging)  # the copy, not only the source, is what it claims
            _fsync(staging)  # its entries, before it gets its name
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():
                    raise
                return self.add(model_dir)  # added meanwhile by another process: compare
            _fsync(self.root)  # the rename itself
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # a failed or a lost race's copy
        return Version.of(target, manifest)

    def versions(self) -> list[Version]:
        """Every version, oldest first (by ``created_at``, then id), each checked against its
        manifest (every file hashed): a version copied in only in part, or changed, comes with
        its :attr:`Version.problem`. Raises RegistryError if the registry directory does not
        exist."""
        if not self.root.is_dir():
            raise RegistryError(f"model registry {self.root} does not exist: add a version "
                                "with `triage train --registry DIR`")
        found = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                manifest = artifact.read_manifest(path)
            except (artifact.ArtifactError, OSError) as exc:
                if VERSION_ID.fullmatch(path.name):  # a version whose copy has not finished
                    found.append(Version(path.name, path, "", float("nan"), {},
                                         _manifest_problem(path, exc)))
                continue  # lost+found: not a version, not an error
            found.append(replace(Version.of(path, manifest),
                                 problem=_files_problem(path, manifest)))
        return sorted(found, key=lambda v: (v.created_at, v.version))

    def path(self, version: str) -> Path:
        """The directory of ``version``. Raises RegistryError if it is not in the registry."""
        if not version or version.startswith(".") or Path(version).name != version:
            raise RegistryError(f"{version!r} is not a version id")
        path = self.root / version
        if path.is_dir() and not (path / artifact.MANIFEST).is_file():
            raise RegistryError(f"version {version} in the registry {self.root} is "
                                f"incomplete: {artifact.MANIFEST} missing (a copy not "
                                "finished?)")
        if not (path / artifact.MANIFEST).is_file():
            known = ", ".join(v.version for v in self.versions() if v.complete) or "none"
            raise RegistryError(f"version {version} is not in the registry {self.root} "
                                f"(versions: {known})")
        return path

    def backtests(self, version: str) -> Path:
        """Where ``version``'s backtest reports are kept: ``<registry>/backtests/<version>/``
        (beside the versions, never inside one: a version's files are hashed). Raises
        RegistryError for a version id that is not one."""
        if not version or version.startswith(".") or Path(version).name != version:
            raise RegistryError(f"{version!r} is not a version id")
        return self.root / "backtests" / version

    def save_backtest(self, report: dict[str, Any]) -> Path:
        """Keep a backtest report (consumer/backtest.py's JSON, with its ``id`` and
        ``candidate``) as ``backtests/<candidate>/<id>.json``; returns its path."""
        folder = self.backtests(report["candidate"])
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{report['id']}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(report, indent=1))
        os.replace(temporary, path)  # a reader never sees half a report
        return path

    def latest_backtest(self, version: str) -> dict[str, Any] | None:
        """The newest backtest report kept for ``version`` (ids sort by time), or None.
        Raises RegistryError for a report that is not JSON."""
        reports = sorted(self.backtests(version).glob("bt-*.json"))
        if not reports:
            return None
        try:
            found: dict[str, Any] = json.loads(reports[-1].read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"backtest report {reports[-1]} cannot be read: {exc}") from None
        return found

    def get(self, version: str) -> Version:
        """``version``, verified: every file has the hash its manifest records. Raises
        RegistryError if unknown, ArtifactError if a file was changed."""
        path = self.path(version)
        return Version.of(path, artifact.verify(path))


# -- the rules of changing versions ----------------------------------------------------------
# A gate is a function of figures (and ``force``) that returns whether the promotion was forced
# past it and raises PromotionRefused when it is not passed and not forced (_gate). Adding one
# (a backtest required before promotion, ...) is one more function here and one call in the CLI.


def _gate(gate: str, passed: bool, force: bool, refusal: str) -> bool:
    """False when ``passed``; True when not passed but ``force``d. Raises PromotionRefused
    (``gate``, ``refusal`` and how to override it) when neither."""
    if passed:
        return False
    if not force:
        raise PromotionRefused(gate, f"{refusal}; not promoted (--force overrides)")
    return True


def check_accuracy(version: Version, min_accuracy: float, force: bool = False) -> bool:
    """The offline gate: ``version``'s holdout accuracy against the policy (0..1, its
    manifest's) must be at least ``min_accuracy`` (0..1); a version whose manifest records no
    accuracy does not pass. Returns True when it did not pass and ``force`` promotes it anyway,
    False when it passed. Raises PromotionRefused (gate "min_accuracy") otherwise."""
    accuracy = version.holdout_accuracy
    refusal = (f"{version.version}'s manifest records no holdout accuracy to hold against "
               f"--min-accuracy {min_accuracy:.2%}" if math.isnan(accuracy) else
               f"{version.version}'s holdout accuracy {accuracy:.4%} is below --min-accuracy "
               f"{min_accuracy:.2%}")
    return _gate("min_accuracy", accuracy >= min_accuracy, force, refusal)


def check_live(version: str, active: str, pairs: int, shadow_policy_agreement: float,
               active_policy_agreement: float, force: bool = False) -> bool:
    """The live gate: ``version``, run in shadow beside the ``active`` one, must agree with the
    policy on live traffic at least as often as the active one did on the same orders: its own
    policy (promoting it adopts the policy it was trained on: model_v2 is judged by policy v2,
    which model_v1 does not follow on bursts). The
    figures are consumer/shadow.py's ``compare``: ``pairs`` orders scored by both, and each
    version's share of them on which it agreed with the policy (0..1). With no pairs there is
    nothing to compare and the gate does not apply (False). Returns True when it did not pass
    and ``force`` promotes it anyway, False when it passed. Raises PromotionRefused (gate
    "live") otherwise."""
    passed = pairs == 0 or shadow_policy_agreement >= active_policy_agreement
    return _gate("live", passed, force,
                 f"{version} agrees with the policy less often on live traffic "
                 f"({shadow_policy_agreement:.2%}) than the active version "
                 f"({active_policy_agreement:.2%})")


#: A backtest (consumer/backtest.py) passes over at least this many orders...
MIN_BACKTEST_ORDERS = 1_000
#: ... with the candidate's agreement with the policy no more than this below the active's.
BACKTEST_TOLERANCE = 0.001


def check_backtest(version: str, report: dict[str, Any] | None, active: str | None,
                   min_agreement: float, force: bool = False) -> bool:
    """The backtest gate (``--require-backtest``): ``report`` (the latest backtest of
    ``version``, consumer/backtest.py's JSON; None: never backtested) passes when it scored at
    least MIN_BACKTEST_ORDERS orders, the candidate agreed with the policy on at least
    ``min_agreement`` of them (0..1), and, if a version is ``active``, the report compared it
    with that same version and the candidate's agreement is no more than BACKTEST_TOLERANCE
    (0.1 percentage points) below the active one's. Returns True when it did not pass and
    ``force`` promotes it anyway, False when it passed. Raises PromotionRefused (gate
    "backtest") otherwise."""
    if report is None:
        return _gate("backtest", False, force, f"{version} has no backtest: run `triage models "
                     f"backtest {version}` first")
    ours = report.get("candidate_policy_agreement") or 0.0
    theirs = report.get("active_policy_agreement")
    orders = int(report.get("orders") or 0)
    found = f"backtest {report.get('id')}"
    if orders < MIN_BACKTEST_ORDERS:
        refusal = f"{found} scored {orders:,} orders, fewer than {MIN_BACKTEST_ORDERS:,}"
    elif ours < min_agreement:
        refusal = (f"in {found} {version} agreed with the policy on {ours:.2%}, below "
                   f"--min-agreement {min_agreement:.2%}")
    elif active is not None and report.get("active") != active:
        refusal = (f"{found} compared {version} with {report.get('active') or 'no version'}, "
                   f"not with the active {active}: backtest it again")
    elif active is not None and theirs is not None and ours < theirs - BACKTEST_TOLERANCE:
        refusal = (f"in {found} {version} agreed with the policy on {ours:.2%}, more than "
                   f"{BACKTEST_TOLERANCE:.1%} below the active {active}'s {theirs:.2%}")
    else:
        return False
    return _gate("backtest", False, force, refusal)


def check_shadow(active: str | None, shadow: str | None) -> None:
    """Whether ``shadow`` (a version id; None stops shadow scoring) may run beside ``active``
    (None: no version is active yet). Raises ChangeRefused when no version is active, or when
    ``shadow`` is the active version."""
    if active is None:
        raise ChangeRefused("no version is active yet: promote one before shadowing another")
    if shadow == active:
        raise ChangeRefused(f"{shadow} is the active version: shadow another one")


def check_rollback(active: str | None, previous: str | None) -> str:
    """The version a rollback makes active: ``previous``, the one active before ``active``.
    Raises ChangeRefused when there is none (no version active, or only ever one)."""
    if active is None or previous is None:
        raise ChangeRefused("nothing to roll back to: no version was active before this one")
    return previous


# What artifact.save names a version: "xgb-" and the model file's sha256's first 12 digits.
VERSION_ID = re.compile(r"xgb-[0-9a-f]{12}")


def _manifest_problem(path: Path, exc: Exception) -> str:
    if not (path / artifact.MANIFEST).exists():
        return f"incomplete: {artifact.MANIFEST} missing"
    return f"incomplete: {artifact.MANIFEST} unreadable ({exc})"


def _files_problem(path: Path, manifest: dict[str, Any]) -> str | None:
    """None when every file ``manifest`` lists is in ``path`` with its sha256; else the first
    that is not (artifact.verify's check, told as a state rather than raised)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "its manifest lists no files"
    for name, expected in files.items():
        file = path / name
        if Path(name).name != name:
            return f"its manifest lists {name!r}, outside the version's directory"
        if not file.is_file():
            return f"incomplete: {name} missing"
        if artifact.sha256_of(file) != expected:
            return (f"{name} does not match its manifest (a copy not finished, or changed "
                    "after training)")
    if manifest.get("version") != path.name:
        return f"its manifest is version {manifest.get('version')}, not {path.name}"
    return None


def _copy_durably(src: str, dst: str) -> str:
    """``shutil.copy2``, then the copy's data forced to disk (fsync)."""
    copied = shutil.copy2(src, dst)
    fd = os.open(copied, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return str(copied)


def _fsync(directory: Path) -> None:
    """Force ``directory``'s entries (names created or renamed in it) to disk. Platforms that
    cannot open a directory (Windows) skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
