"""Temporary directories a process owns, and the removal of those whose owner is gone.

A process killed with SIGKILL (or the OOM killer) cannot remove its temporary directory: the
supervisor's worker status files, Apache Kafka's data. Each such directory records its owner's
pid in :data:`OWNER_FILE`; the next process that makes one of the same kind removes those whose
owner no longer runs. Found by a new user: 33 ``triage-workers-*`` directories left in /tmp.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

OWNER_FILE = "owner.pid"


def owned_tempdir(prefix: str) -> Path:
    """A new directory ``prefix*`` in the temporary directory, recording this process as its
    owner; directories of the same prefix whose owner is gone are removed first."""
    remove_orphaned(prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    (path / OWNER_FILE).write_text(str(os.getpid()))
    return path


# A directory is removed only once nothing in it has changed for this long (s): a worker
# outliving its supervisor for a moment, or a process of another PID namespace sharing /tmp
# (its pid means nothing here), still writes in it. A live broker rewrites its checkpoints
# every minute, workers their status every second.
QUIET_S = 600.0


def remove_orphaned(prefix: str, tmp: Path | None = None, quiet_s: float = QUIET_S
                    ) -> list[Path]:
    """Remove the directories ``prefix*`` in ``tmp`` (default: the temporary directory) whose
    OWNER_FILE names a pid no process has and in which nothing changed for ``quiet_s``. A
    directory without one, whose owner runs (or belongs to another user), or still written
    to, is left. Returns what was removed."""
    removed = []
    for path in Path(tmp or tempfile.gettempdir()).glob(prefix + "*"):
        try:
            os.kill(int((path / OWNER_FILE).read_text()), 0)
        except ProcessLookupError:
            if time.time() - _last_change(path) >= quiet_s:
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    removed.append(path)
        except (OSError, ValueError):  # no owner file, not ours to judge, or its owner runs
            continue
    return removed


def _last_change(path: Path) -> float:
    """The latest modification time (epoch s) of ``path`` and everything under it."""
    latest = path.stat().st_mtime
    for entry in path.rglob("*"):
        with contextlib.suppress(OSError):  # gone meanwhile
            latest = max(latest, entry.stat().st_mtime)
    return latest
