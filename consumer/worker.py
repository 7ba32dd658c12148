"""One scorer worker process: ``python -m triage.consumer.worker --model DIR [--reference DIR]``.

``--reference DIR``: load the reference CSVs as a snapshot first; the live reference streams
apply on top either way (scoring/feed.py).

WorkerSettings come from the ``TRIAGE_*`` environment the supervisor passes down; ``triage worker``
runs the same :func:`run` in its own process with no supervisor (one worker per Kubernetes
pod, where the orchestrator restarts it). Exit status: 0 after
a requested stop (SIGTERM/SIGINT: finish the batch, commit, leave the group), 1 after an
infrastructure failure or an unexpected error (the supervisor restarts the worker), 2 for a
configuration error (it does not: a restart would fail the same way).

Started with ``--supervisor-pid``, the worker stops as if sent SIGTERM once that process is
gone (it checks its parent every 0.5 s), so a supervisor killed with SIGKILL leaves no orphan
workers polling the group.

A stop asked for while the worker is still starting (loading the model, asking the brokers for
topic metadata and limits, restoring the reference tables: before its batch loop consumes an
order) ends the process at once with status 0 (:class:`StartupStop`): nothing has been consumed,
so nothing is lost, and a call that waits on unreachable brokers (10 s each) does not hold the
stop back. A worker that had already joined the consumer group leaves it by session timeout
then, not by a LeaveGroup.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import structlog

from triage.bus.clients import check_brokers, is_embedded, records_in, require_topics
from triage.bus.errors import EXIT_CONFIGURATION, ConfigurationError, exit_status, is_expected
from triage.bus.health import Health, serve
from triage.bus.logs import configure_logging
from triage.bus.settings import SettingsError
from triage.consumer.loop import BatchLoop
from triage.consumer.settings import WorkerSettings
from triage.model.streams import REFERENCE_STREAMS

if TYPE_CHECKING:
    from triage.consumer.scorer import Scorer

# The scoring stack (NumPy, fastavro, the model, pandas for CSVs) is imported by run() once it
# has subscribed, so that the group join overlaps the imports and loading.

_PARENT_CHECK_S = 0.5
# A worker joins the orders group before it loads and restores only when the restore reads at
# most this many records of the reference streams (all three are global tables): about a
# second at the measured ~110,000 records/s (a million in 9.1 s, docs/benchmarks.md).
# Otherwise it joins after, as it would hold partitions it cannot read yet. (On the embedded
# broker the watermarks this asks for count produce batches, not records, so it joins early
# more often there.)
EARLY_JOIN_MAX_RECORDS = 100_000
READINESS = ("model_loaded", "reference_restored", "group_joined")  # /readyz waits for these
_MANIFEST = "manifest.json"  # model/artifact.py MANIFEST, without importing NumPy this early


def watch_parent(supervisor_pid: int, on_gone: Callable[[], None],
                 interval_s: float = _PARENT_CHECK_S) -> threading.Thread:
    """Call ``on_gone()`` once this process's parent is no longer ``supervisor_pid`` (it died
    and the process was re-parented). A daemon thread; works on Linux and macOS alike."""
    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(interval_s):
            if os.getppid() != supervisor_pid:
                on_gone()
                return

    thread = threading.Thread(target=watch, name="watch-supervisor", daemon=True)
    thread.start()
    return thread


class StartupStop:
    """Until :meth:`running` is called, a SIGTERM or SIGINT ends the process at once (exit
    status 0, a ``stop_requested`` log line with ``during="startup"``), even while the main
    thread waits inside a client library's call: Python runs signal handlers between bytecodes
    only, on the main thread, so a handler would wait for that call to return. The signal's
    number reaches a watching thread through :func:`signal.set_wakeup_fd`, and that thread
    ends the process. The worker's Python handlers call :meth:`stop` first: during start-up
    it leaves the signal to the watching thread (logging from a handler could wait forever on
    a lock the interrupted code holds), and a signal the thread had not acted on when the loop
    started is returned by :meth:`running` for the worker to stop as usual. Make it on the
    main thread, before the handlers."""

    def __init__(self, log: structlog.typing.FilteringBoundLogger) -> None:
        self.log = log
        self._lock = threading.Lock()  # running() against an exit: one of them wins
        self._running = False
        self._exiting = False
        self._deferred: str | None = None  # a signal the main thread's handler left to us
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="startup-stop", daemon=True).start()

    def _watch(self) -> None:
        while data := os.read(self._read, 64):  # b"" once running() closed the write end
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self.stop(signal.Signals(signum).name)
        os.close(self._read)

    def stop(self, reason: str) -> bool:
        """True once the worker runs its loop (the caller's own stop applies); else False,
        having ended the process (from any thread but the main one) or left it to the
        watching thread (from the main one, a signal handler)."""
        if threading.current_thread() is threading.main_thread():
            if self._running:
                return True
            self._deferred = reason
            return False
        with self._lock:
            if self._running:
                return True
            self._exiting = True
        try:  # said from a thread of its own, waited for 1 s at most: a log lock held by the
            # interrupted main thread must not hold the exit back. No flush here: stderr is
            # line-buffered, so every whole line is out, and a flush would write the main
            # thread's half-written one.
            said = threading.Thread(target=self.log.info, args=("stop_requested",),
                                    kwargs={"reason": reason, "during": "startup"}, daemon=True)
            said.start()
            said.join(1.0)
        finally:
            end_process(0)

    def running(self) -> str | None:
        """The batch loop is about to consume (or the worker is leaving without it): from now
        on a stop is the Python handlers' (finish the batch, commit, leave the group). Returns
        the reason of a stop the watching thread had not acted on yet, else None."""
        with self._lock:
            if self._exiting:  # the watching thread is ending the process
                threading.Event().wait()
            if self._running:
                return None
            self._running = True
        signal.set_wakeup_fd(self._previous)
        os.close(self._write)
        return self._deferred


def end_process(status: int) -> NoReturn:
    """End the worker's process with ``status`` at once, without the interpreter's finalisation:
    :func:`run` has closed what matters (the group left, the producer flushed), and a client's
    destructor can wait on a broker connection stuck in a handshake (a worker with failing
    SASL credentials outlived its supervisor's 90 s wait after SIGTERM, under load). stderr is
    line-buffered: every whole log line is out already."""
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    """The worker process as the supervisor starts it: settings from the ``TRIAGE_*``
    environment; returns the exit status (module docstring)."""
    parser = argparse.ArgumentParser(prog="triage.consumer.worker")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory")
    source.add_argument("--registry", help="model registry: follow the models control topic")
    parser.add_argument("--reference", help="directory of the reference CSVs (a snapshot)")
    parser.add_argument("--worker-id", default="0")
    parser.add_argument("--status-file", type=Path,
                        help="where to keep this worker's assigned partitions (JSON)")
    parser.add_argument("--supervisor-pid", type=int,
                        help="stop when this process (the parent) is gone")
    args = parser.parse_args(argv)
    try:
        settings = WorkerSettings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIGURATION
    configure_logging(settings.log_format, settings.log_level)
    return run(settings, args.model, args.reference, worker_id=args.worker_id,
               status_file=args.status_file, supervisor_pid=args.supervisor_pid,
               registry_dir=args.registry, serving_process=True)


def run(settings: WorkerSettings, model_dir: str | Path | None, reference_dir: str | Path | None, *,
        worker_id: str = "0", status_file: Path | None = None,
        supervisor_pid: int | None = None, registry_dir: str | Path | None = None,
        serving_process: bool = False) -> int:
    """Run one worker in this process until SIGTERM/SIGINT; returns its exit status (module
    docstring). The model: ``model_dir``, or with ``registry_dir`` the version the models
    control topic says is active, swapped between batches when it changes (scoring/follower.py).
    With ``TRIAGE_METRICS_PORT``, ``/metrics``, ``/healthz`` and ``/readyz`` are served on that
    port + ``worker_id`` from the start (bus/health.py): ready once the model is loaded, the
    reference tables restored and the consumer group joined. ``serving_process``: this process
    only serves (``triage worker``, a supervisor's worker), so xgboost is imported without
    scikit-learn (model/artifact.py import_xgboost_for_serving); never in a process that may
    train."""
    log = structlog.get_logger("worker").bind(worker=worker_id)
    scorer: Scorer | None = None
    stop_requested = threading.Event()

    def stop(reason: str) -> None:
        if not starting.stop(reason):  # still starting: the process ends (StartupStop)
            return
        log.info("stop_requested", reason=reason)
        stop_requested.set()
        if scorer is not None:
            scorer.request_stop()

    starting = StartupStop(log)
    signal.signal(signal.SIGTERM, lambda signum, _: stop(signal.Signals(signum).name))
    signal.signal(signal.SIGINT, lambda signum, _: stop(signal.Signals(signum).name))
    if supervisor_pid:
        watch_parent(supervisor_pid, lambda: stop("supervisor_gone"))
        if os.getppid() != supervisor_pid:  # it died before the watch began
            stop("supervisor_gone")

    def running() -> None:  # the loop starts: a stop the start-up left pending applies now
        deferred = starting.running()
        if deferred is not None:
            stop(deferred)

    health = Health(settings.scorer.health_stall_ms, READINESS)
    server = follower = loop = None
    try:
        if settings.connection.group_protocol == "consumer" and is_embedded(settings.connection):
            raise ConfigurationError(
                "TRIAGE_GROUP_PROTOCOL=consumer (KIP-848) needs Apache Kafka 4.x; the embedded "
                "broker (tansu) speaks only the classic protocol: leave the setting out there")
        if model_dir is not None and not (Path(model_dir) / _MANIFEST).is_file():
            # A configuration error first, before the brokers are asked (model/artifact.py
            # checks the rest once it is imported, after the group join began).
            raise ConfigurationError(f"{Path(model_dir) / _MANIFEST} not found: is {model_dir} "
                                     "a model directory written by `triage train`?")
        loop = BatchLoop(settings.connection, settings.scorer, settings.topics.orders_topic,
                         worker_id=worker_id, status_file=status_file, log=log, health=health)
        if settings.scorer.metrics_port:
            port = settings.scorer.metrics_port + int(worker_id)
            server = serve(port, health, setting="--metrics-port or TRIAGE_METRICS_PORT "
                           "(worker N listens on it + N)")
            log.info("metrics_serving", port=port, paths=["/metrics", "/healthz", "/readyz"])
        check_brokers(loop.consumer, settings.connection)  # else one clear line, exit 1
        require_topics(loop.consumer, [settings.topics.orders_topic])  # else exit 2: create it
        # Join now, so the join (3 s on a new group) overlaps the imports and loading below,
        # unless the worker will spend long restoring the reference streams (it would hold
        # partitions it does not read) or may wait long for a registry's first version.
        if registry_dir is None:
            backlog = records_in(loop.consumer, [settings.topics.topic_of(s.name)
                                                 for s in REFERENCE_STREAMS])
            if backlog is not None and backlog <= EARLY_JOIN_MAX_RECORDS:
                loop.subscribe()
        if serving_process:
            from triage.model.artifact import import_xgboost_for_serving

            import_xgboost_for_serving()
        from triage.consumer import metrics
        from triage.consumer.scorer import Scorer
        from triage.model import artifact
        from triage.model.policy import CLASSES
        from triage.model.reference import ReferenceTables, zip_code_warnings
        from triage.model.registry import Registry
        from triage.scoring import metrics as scoring_metrics
        from triage.scoring.follower import ModelFollower
        from triage.scoring.hooks import load_hooks

        if registry_dir is not None:
            follower = ModelFollower(settings.connection, settings.topics,
                                     Registry(registry_dir), log=log).start()
            log.info("waiting_for_model", registry=str(registry_dir),
                     control_topic=settings.topics.models_topic)
            first = follower.wait_first(stop=stop_requested.is_set, tick=health.beat)
            if first is None:
                return 0
            loop.subscribe()  # the group join runs while the reference tables load
            model, shadow = first.active, first.shadow
        elif model_dir is not None:
            model, shadow = artifact.load(model_dir), None
        else:
            raise ConfigurationError("a worker needs --model or --registry")
        reference = ReferenceTables.load(reference_dir, encoding=settings.data.csv_encoding) \
            if reference_dir else None
        for warning in zip_code_warnings(reference.keys("zip_codes")) if reference else ():
            log.warning("zip_codes_look_truncated", detail=warning)
        scorer = Scorer(settings, model, reference, worker_id=worker_id,
                        status_file=status_file,
                        extra_hooks=load_hooks(settings.core.hooks, settings), health=health,
                        follower=follower, shadow=shadow, loop=loop)
        health.met("model_loaded")
        if serving_process:
            quiet_garbage_collector()
        metrics.MODEL_INFO.labels(model.version).set(1)
        for recommendation in CLASSES:  # every class has a series from the start, at 0
            scoring_metrics.PREDICTIONS.labels(recommendation)
        if stop_requested.is_set():
            scorer.request_stop()
        scorer.run(running=running)
    except (ConfigurationError, OSError) as exc:  # OSError: a metrics port in use, a file
        if scorer is None:
            log.error("worker_config_error", error=str(exc))
            return EXIT_CONFIGURATION
        return _failed(log, exc)
    except Exception as exc:
        return _failed(log, exc)
    finally:
        starting.running()  # leaving without the loop: a stop now waits for what is left
        if loop is not None:  # left the group and closed, unless its run() already did
            loop.close()
        if follower is not None:
            follower.close()
        if server is not None:
            server.shutdown()
            server.server_close()
    return 0


GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)


def quiet_garbage_collector() -> None:
    """Make the cyclic garbage collector cheap on the hot path, once everything that lives as
    long as the process (modules, the model, the reference tables) is loaded: ``gc.freeze()``
    moves it out of the collector's sight, and young collections run every
    ``GC_YOUNG_THRESHOLD`` allocations instead of 700. A batch allocates about 20 objects an
    order that all stay alive until its outputs are produced, so at the default every young
    collection scanned them again. Records hold no reference cycles; memory is freed by
    reference counting as before."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _failed(log: structlog.typing.FilteringBoundLogger, exc: Exception) -> int:
    """Log why the worker stops (a bug with its traceback) and return its exit status."""
    if isinstance(exc, ConfigurationError):
        log.error("worker_config_error", error=str(exc))
    elif is_expected(exc):
        log.error("worker_failed", error=str(exc))
    else:  # a bug: say so, with the traceback in the log; the supervisor restarts the worker
        log.exception("worker_crashed")
    return exit_status(exc)


if __name__ == "__main__":
    end_process(main())
