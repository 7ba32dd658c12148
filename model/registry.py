"""The model registry: a directory any worker on any machine can read (local, or a volume shared
by compose services or Kubernetes pods), holding one subdirectory per model version, named by
its version id (``xgb-<hash>``, from the artifact's manifest), each a verified artifact
(model/artifact.py). Anything else in the directory is a dot-file (a version being added is
copied to ``.adding-<id>`` and renamed into place, so a reader never sees half of one); a
directory without a readable manifest (``lost+found`` on a mounted volume) is not listed.

The registry holds versions; which one is active, which one runs in shadow and who changed it
when live on the control topic (consumer/models.py), so that every worker agrees on them.

A version's metadata is its manifest's: ``created_at`` (UTC), ``metrics.holdout_accuracy``
(against the policy, on the training run's holdout), ``training.data_sha256`` (of each
training CSV).
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
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
        the same version again is a no-op. Raises ArtifactError if the artifact does not
        verify, RegistryError if a different artifact already has its version id."""
        manifest = artifact.verify(model_dir)
        version = manifest["version"]
        target = self.root / version
        if target.exists():
            if artifact.read_manifest(target)["files"] != manifest["files"]:
                raise RegistryError(f"{target} holds another artifact with version {version}")
            return Version.of(target, manifest)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".adding-{version}-{uuid.uuid4().hex[:8]}"
        shutil.copytree(model_dir, staging)
        staging.rename(target)
        return Version.of(target, manifest)

    def versions(self) -> list[Version]:
        """Every version, oldest first (by ``created_at``, then id). Raises RegistryError if the
        registry directory does not exist."""
        if not self.root.is_dir():
            raise RegistryError(f"model registry {self.root} does not exist: add a version "
                                "with `triage train --registry DIR`")
        found = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:  # lost+found, a directory being synced: not a version, not an error
                found.append(Version.of(path, artifact.read_manifest(path)))
            except (artifact.ArtifactError, OSError):
                continue
        return sorted(found, key=lambda v: (v.created_at, v.version))

    def path(self, version: str) -> Path:
        """The directory of ``version``. Raises RegistryError if it is not in the registry."""
        if not version or version.startswith(".") or Path(version).name != version:
            raise RegistryError(f"{version!r} is not a version id")
        path = self.root / version
        if not (path / artifact.MANIFEST).is_file():
            known = ", ".join(v.version for v in self.versions()) or "none"
            raise RegistryError(f"version {version} is not in the registry {self.root} "
                                f"(versions: {known})")
        return path

    def get(self, version: str) -> Version:
        """``version``, verified: every file has the hash its manifest records. Raises
        RegistryError if unknown, ArtifactError if a file was changed."""
        path = self.path(version)
        return Version.of(path, artifact.verify(path))
