"""Runs N scorer worker processes in one consumer group and keeps them running.

Workers are separate processes (not threads, not forks): each has its own librdkafka clients
and its own XGBoost, and a crash or a SIGKILL takes out one worker only. A worker that exits
unasked is restarted after an exponential backoff. :meth:`Supervisor.stop` sends SIGTERM, which
each worker answers by finishing its batch, committing and leaving the group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from bus.settings import Settings

_BACKOFF_START_S = 1.0
_BACKOFF_MAX_S = 30.0
_HEALTHY_AFTER_S = 60.0  # a worker that ran this long starts over at the shortest backoff


@dataclass
class _Slot:
    worker_id: str
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = _BACKOFF_START_S
    restart_at: float | None = None


@dataclass
class Supervisor:
    settings: Settings          # bootstrap already resolved: workers need no state file
    model_dir: Path
    reference_dir: Path
    workers: int
    slots: list[_Slot] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log = structlog.get_logger("supervisor")
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.status_dir = Path(tempfile.mkdtemp(prefix="triage-workers-"))

    def _status_file(self, slot: _Slot) -> Path:
        return self.status_dir / f"worker-{slot.worker_id}.json"

    def _spawn(self, slot: _Slot) -> None:
        env = {**os.environ, **self.settings.to_env()}
        slot.process = subprocess.Popen(
            [sys.executable, "-m", "consumer.worker", "--model", str(self.model_dir),
             "--reference", str(self.reference_dir), "--worker-id", slot.worker_id,
             "--status-file", str(self._status_file(slot))],
            env=env, stdin=subprocess.DEVNULL)
        slot.started_at = time.monotonic()
        slot.restart_at = None
        self.log.info("worker_spawned", worker=slot.worker_id, pid=slot.process.pid)

    def start(self) -> None:
        with self._lock:
            for i in range(self.workers):
                slot = _Slot(str(i))
                self.slots.append(slot)
                self._spawn(slot)

    def assignments(self) -> dict[str, list[int]]:
        """Partitions each running worker reports it owns (from its status file)."""
        owned = {}
        for slot in self.slots:
            if slot.process is None or slot.process.poll() is not None:
                continue
            with contextlib.suppress(FileNotFoundError, ValueError):
                status = json.loads(self._status_file(slot).read_text())
                if status["pid"] == slot.process.pid:
                    owned[slot.worker_id] = status["partitions"]
        return owned

    def balanced(self, partitions: int) -> bool:
        """True when the workers together own all ``partitions`` and each (up to the partition
        count) owns some: the group has settled after its joins."""
        owned = self.assignments()
        busy = sum(1 for p in owned.values() if p)
        return (sum(len(p) for p in owned.values()) == partitions
                and busy == min(partitions, len(self.slots)))

    def wait_until_assigned(self, partitions: int, timeout_s: float = 60.0) -> None:
        """Block until :meth:`balanced` (readiness for a replay or a test)."""
        deadline = time.monotonic() + timeout_s
        while not self.balanced(partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers own {self.assignments()} after {timeout_s:.0f} s, "
                                   f"expected {partitions} partitions in all")
            self._stopping.wait(0.1)

    def pids(self) -> list[int]:
        return [s.process.pid for s in self.slots if s.process and s.process.poll() is None]

    def check(self) -> None:
        """Restart workers that exited unasked, after their backoff."""
        now = time.monotonic()
        with self._lock:
            if self._stopping.is_set():
                return
            for slot in self.slots:
                if slot.restart_at is not None:
                    if now >= slot.restart_at:
                        slot.restarts += 1
                        self._spawn(slot)
                    continue
                code = slot.process.poll() if slot.process else None
                if code is None:
                    continue
                if now - slot.started_at >= _HEALTHY_AFTER_S:
                    slot.backoff_s = _BACKOFF_START_S
                slot.restart_at = now + slot.backoff_s
                self.log.warning("worker_exited", worker=slot.worker_id, exit_code=code,
                                 restart_in_s=slot.backoff_s, restarts=slot.restarts)
                slot.backoff_s = min(slot.backoff_s * 2, _BACKOFF_MAX_S)

    def request_stop(self) -> None:
        """Make :meth:`run` return (safe from a signal handler); then call :meth:`stop`."""
        self._stopping.set()

    def run(self, poll_s: float = 0.5) -> None:
        """Supervise until :meth:`request_stop` or :meth:`stop` is called."""
        while not self._stopping.wait(poll_s):
            self.check()

    def stop(self, timeout_s: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every worker, wait for them to drain, SIGKILL any still running at timeout."""
        self._stopping.set()
        with self._lock:
            running = [s for s in self.slots if s.process and s.process.poll() is None]
            for slot in running:
                slot.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            codes: dict[str, int | None] = {}
            for slot in self.slots:
                if slot.process is None:
                    continue
                try:
                    codes[slot.worker_id] = slot.process.wait(
                        timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.log.error("worker_kill_after_timeout", worker=slot.worker_id)
                    slot.process.kill()
                    codes[slot.worker_id] = slot.process.wait()
        self.log.info("workers_stopped", exit_codes=codes)
        return codes
