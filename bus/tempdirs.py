"""Temporary directories a process owns, and the removal of those whose owner is gone.

A process killed with SIGKILL (or the OOM killer) cannot remove its temporary directory: the
supervisor's worker status files, Apache Kafka's data. Each such directory records its owner's
pid in :data:`OWNER_FILE`; the next process that makes one of the same kind removes those whose
owner no longer runs. Found by a new user: 33 ``triage-workers-*`` directories left in /tmp.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

OWNER_FILE = "owner.pid"


def owned_tempdir(prefix: str) -> Path:
    """A new directory ``prefix*`` in the temporary directory, recording this process as its
    owner; directories of the same prefix whose owner is gone are removed first."""
    remove_orphaned(prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    (path / OWNER_FILE).write_text(str(os.getpid()))
    return path


def remove_orphaned(prefix: str, tmp: Path | None = None) -> list[Path]:
    """Remove the directories ``prefix*`` in ``tmp`` (default: the temporary directory) whose
    OWNER_FILE names a pid no process has. A directory without one, or whose owner runs (or
    belongs to another user), is left. Returns what was removed."""
    removed = []
    for path in Path(tmp or tempfile.gettempdir()).glob(prefix + "*"):
        try:
            os.kill(int((path / OWNER_FILE).read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except (OSError, ValueError):  # no owner file, not ours to judge, or its owner runs
            continue
    return removed
