"""The model registry: a directory any worker on any machine can read (local, or a volume shared
by compose services or Kubernetes pods), holding one subdirectory per model version, named by
its version id (``xgb-<hash>``, from the artifact's manifest), each a verified artifact
(model/artifact.py). Anything else in the directory is a dot-file (a version being added is
copied to ``.adding-<id>``, checked against its manifest, written to disk (fsync) and only then
renamed into place, so a reader never sees half of one, even after a crash); a directory
without a readable manifest and without a version's name (``lost+found`` on a mounted volume)
is not listed.

A version copied in by other means (``cp -r``, rsync, a volume being synced) can be seen half
way: :meth:`Registry.versions` lists it with its ``problem`` ("incomplete: model.json
missing", "model.json does not match its manifest ...") instead of as a candidate, and
:meth:`Registry.get` (what promoting and shadowing call) refuses it.

The registry holds versions; which one is active, which one runs in shadow and who changed it
when live on the control topic (scoring/follower.py), so that every worker agrees on them.

A version's metadata is its manifest's: ``created_at`` (UTC), ``metrics.holdout_accuracy``
(against the policy, on the training run's holdout), ``training.data_sha256`` (of each
training CSV).
"""

from __future__ import annotations

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
                   dict(manifest.get("training", {}).get("data_sha256", {})))


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

    def get(self, version: str) -> Version:
        """``version``, verified: every file has the hash its manifest records. Raises
        RegistryError if unknown, ArtifactError if a file was changed."""
        path = self.path(version)
        return Version.of(path, artifact.verify(path))


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
