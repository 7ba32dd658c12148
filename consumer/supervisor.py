"""Runs scorer worker processes in one consumer group and keeps them running.

Workers are separate processes (not threads, not forks): each has its own librdkafka clients
and its own XGBoost, and a crash or a SIGKILL takes out one worker only. A worker that exits
unasked is restarted after an exponential backoff (1 s doubling to 30 s; back to 1 s after a
minute of health). :meth:`Supervisor.stop` sends SIGTERM, which each worker answers by finishing
its batch, committing and leaving the group.

With an :class:`~consumer.autoscale.Autoscaler`, the supervisor samples its workers' lag (each
worker reports the lag of its own partitions in its status file) and adds or retires workers.
Scaling across machines needs nothing from here: another ``triage consume`` anywhere joins the
same group, and the group rebalances.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from triage.bus.errors import EXIT_CONFIGURATION, WaitTimeout
from triage.bus.tempdirs import owned_tempdir
from triage.consumer.autoscale import Autoscaler
from triage.consumer.settings import WorkerSettings

_BACKOFF_START_S = 1.0
_BACKOFF_MAX_S = 30.0
_HEALTHY_AFTER_S = 60.0


def worker_env(settings: WorkerSettings) -> dict[str, str]:
    """The environment of a worker process: its settings, and two glibc malloc arenas instead
    of one per core and thread (librdkafka's threads), which keeps its resident memory about
    30 MB lower (docs/benchmarks.md). An operator's own MALLOC_ARENA_MAX wins."""
    return {"MALLOC_ARENA_MAX": "2", **os.environ, **settings.to_env()}


@dataclass
class _Slot:
    worker_id: str
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = _BACKOFF_START_S
    restart_at: float | None = None
    retiring: bool = False


@dataclass
class Supervisor:
    settings: WorkerSettings          # bootstrap already resolved: workers need no state file
    model_dir: Path | None      # None: the workers follow ``registry_dir``
    reference_dir: Path | None  # a CSV snapshot for every worker, or None
    workers: int
    autoscaler: Autoscaler | None = None
    scale_interval_s: float = 5.0
    registry_dir: Path | None = None  # a model registry the workers follow (scoring/follower.py)
    slots: list[_Slot] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log = structlog.get_logger("supervisor")
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.status_dir = owned_tempdir("triage-workers-")  # a SIGKILLed one's is swept
        self.restarts = 0
        self.retired: dict[str, int] = {}
        # Set when no worker can run any more (all stopped with a configuration error):
        # run() returns, and the command exits with this status instead of idling forever.
        self.failure: str | None = None
        self.config_errors = 0
        self._next_scale_check = 0.0

    # -- worker processes --------------------------------------------------------------------

    def _status_file(self, slot: _Slot) -> Path:
        return self.status_dir / f"worker-{slot.worker_id}.json"

    def _spawn(self, slot: _Slot) -> None:
        env = worker_env(self.settings)
        slot.process = subprocess.Popen(
            [sys.executable, "-m", "triage.consumer.worker",
             *(["--registry", str(self.registry_dir)] if self.registry_dir
               else ["--model", str(self.model_dir)]),
             *(["--reference", str(self.reference_dir)] if self.reference_dir else []),
             "--worker-id", slot.worker_id,
             "--status-file", str(self._status_file(slot)),
             "--supervisor-pid", str(os.getpid())],
            env=env, stdin=subprocess.DEVNULL)
        slot.started_at = time.monotonic()
        slot.restart_at = None
        self.log.info("worker_spawned", worker=slot.worker_id, pid=slot.process.pid)

    def _add_worker(self) -> None:
        slot = _Slot(str(next(self._ids)))
        self.slots.append(slot)
        self._spawn(slot)

    def retire_worker(self) -> str:
        """SIGTERM the newest active worker; it drains and leaves the group, and its slot goes
        once it has exited (its exit code lands in ``retired``). Returns its id."""
        with self._lock:
            active = [s for s in self.slots if not s.retiring]
            if not active:
                raise RuntimeError("no active worker left to retire")
            slot = active[-1]
            slot.retiring = True
            if slot.process and slot.process.poll() is None:
                slot.process.send_signal(signal.SIGTERM)
            return slot.worker_id

    def start(self) -> None:
        with self._lock:
            for _ in range(self.workers):
                self._add_worker()

    def pids(self) -> list[int]:
        return [s.process.pid for s in list(self.slots)
                if s.process and s.process.poll() is None]

    def active_workers(self) -> int:
        return sum(1 for s in list(self.slots) if not s.retiring)

    def statuses(self) -> dict[str, dict[str, Any]]:
        """What each running worker last reported: partitions, lag, consumed."""
        found = {}
        for slot in list(self.slots):  # a copy: check() may change the list meanwhile
            if slot.process is None or slot.process.poll() is not None:
                continue
            with contextlib.suppress(FileNotFoundError, ValueError):
                status = json.loads(self._status_file(slot).read_text())
                if status["pid"] == slot.process.pid:
                    found[slot.worker_id] = status
        return found

    def assignments(self) -> dict[str, list[int]]:
        """Partitions each running worker reports it owns."""
        return {worker: s["partitions"] for worker, s in self.statuses().items()}

    def balanced(self, partitions: int) -> bool:
        """True when the workers together own all ``partitions`` and each (up to the partition
        count) owns some: the group has settled after its joins."""
        owned = self.assignments()
        busy = sum(1 for p in owned.values() if p)
        return (sum(len(p) for p in owned.values()) == partitions
                and busy == min(partitions, self.active_workers()))

    def wait_until_assigned(self, partitions: int, timeout_s: float = 60.0,
                            stop: Callable[[], bool] | None = None) -> None:
        """Block until :meth:`balanced` (readiness for a replay or a test), or until ``stop()``
        (asked every 0.1 s) is True. Raises WaitTimeout after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.balanced(partitions):
            if time.monotonic() > deadline:
                raise WaitTimeout(
                    f"workers own {self.assignments()} after {timeout_s:.0f} s, expected "
                    f"{partitions} partitions in all; their log's partitions_unowned warning "
                    "says why (on the embedded broker a group restarted after it sat empty can "
                    "stay unassigned: restart `triage broker`, or use a new group with --group "
                    "or TRIAGE_GROUP_ID; docs/operating.md)")
            if stop is not None and stop():
                return
            self._stopping.wait(0.1)

    # -- supervision -------------------------------------------------------------------------

    def check(self) -> None:
        """Restart workers that exited unasked; drop retired ones; autoscale."""
        now = time.monotonic()
        with self._lock:
            if self._stopping.is_set():
                return
            for slot in list(self.slots):
                code = slot.process.poll() if slot.process else None
                if slot.retiring:
                    if code is not None:
                        self.slots.remove(slot)
                        self.retired[slot.worker_id] = code
                        self.log.info("worker_retired", worker=slot.worker_id, exit_code=code)
                    continue
                if slot.restart_at is not None:
                    if now >= slot.restart_at:
                        slot.restarts += 1
                        self.restarts += 1
                        self._spawn(slot)
                    continue
                if code is None:
                    continue
                if code == EXIT_CONFIGURATION:  # a restart would fail the same way
                    self.log.error("worker_config_error_not_restarting", worker=slot.worker_id)
                    self.slots.remove(slot)
                    self.retired[slot.worker_id] = code
                    self.config_errors += 1
                    continue
                if now - slot.started_at >= _HEALTHY_AFTER_S:
                    slot.backoff_s = _BACKOFF_START_S
                slot.restart_at = now + slot.backoff_s
                self.log.warning("worker_exited", worker=slot.worker_id, exit_code=code,
                                 restart_in_s=slot.backoff_s, restarts=slot.restarts)
                slot.backoff_s = min(slot.backoff_s * 2, _BACKOFF_MAX_S)
            if self.config_errors and not any(not s.retiring for s in self.slots):
                self.failure = ("every worker stopped with a configuration error (see the "
                                "worker_config_error log lines); none is left to run")
                self.log.error("no_worker_can_run", reason=self.failure)
                self._stopping.set()
                return
            if self.autoscaler is not None and now >= self._next_scale_check:
                self._next_scale_check = now + self.scale_interval_s
                self._autoscale()

    def _autoscale(self) -> None:
        statuses = self.statuses()
        lags: list[int | None] = [s.get("lag") for s in statuses.values()]
        known = [lag for lag in lags if lag is not None]
        if self.autoscaler is None or not statuses or len(known) < len(lags):
            return  # a worker is (re)joining: no trustworthy figure this round
        workers = self.active_workers()
        decision = self.autoscaler.decide(sum(known), workers)
        if decision.change:
            self.log.info("autoscale", change=decision.change, reason=decision.reason,
                          lag_window=list(decision.lag_window), workers_before=workers,
                          workers_after=workers + decision.change)
            if decision.change > 0:
                self._add_worker()
            else:  # the autoscaler never goes below --min >= 1, so one is active
                slot = [s for s in self.slots if not s.retiring][-1]
                slot.retiring = True
                if slot.process is not None:
                    slot.process.send_signal(signal.SIGTERM)

    def request_stop(self) -> None:
        """Make :meth:`run` return (safe from a signal handler); then call :meth:`stop`."""
        self._stopping.set()

    def run(self, poll_s: float = 0.5) -> None:
        """Supervise until :meth:`request_stop` or :meth:`stop` is called."""
        while not self._stopping.wait(poll_s):
            self.check()

    def stop(self, timeout_s: float = 90.0) -> dict[str, int | None]:
        """SIGTERM every worker, wait for them to drain, SIGKILL any still running at timeout
        (90 s: longer than a worker's worst drain, a 60 s flush plus commit retries)."""
        self._stopping.set()
        with self._lock:
            for slot in self.slots:
                if slot.process and slot.process.poll() is None:
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
        shutil.rmtree(self.status_dir, ignore_errors=True)
        self.log.info("workers_stopped", exit_codes=codes)
        return codes
