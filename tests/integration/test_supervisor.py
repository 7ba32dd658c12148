"""The supervisor's restart policy, with real worker processes."""

from __future__ import annotations

import time
from pathlib import Path

from triage.consumer.supervisor import Supervisor
from triage.settings import Settings


def test_a_worker_with_a_configuration_error_is_not_restarted(tmp_path: Path) -> None:
    """A model directory that is not one: the worker exits 2, and restarting it would only
    fail the same way, forever."""
    settings = Settings.of(bootstrap_servers="127.0.0.1:9", state_dir=str(tmp_path))
    supervisor = Supervisor(settings, tmp_path / "no-model", tmp_path, workers=1)
    supervisor.start()
    try:
        deadline = time.monotonic() + 60
        while "0" not in supervisor.retired:
            assert time.monotonic() < deadline
            supervisor.check()
            time.sleep(0.1)
    finally:
        supervisor.stop()
    assert supervisor.retired == {"0": 2}
    assert supervisor.restarts == 0 and supervisor.active_workers() == 0
