"""Apache Kafka, started by the project: a single-node KRaft broker (combined broker and
controller) from Apache Kafka's own jars on Maven Central, for the tests and for people who
want a real Kafka locally without Docker (``triage broker --kafka``).

**Jars.** ``org.apache.kafka:kafka_2.13`` at :data:`KAFKA_VERSION`, plus Log4j 2's SLF4J
binding (``log4j-slf4j-impl``, :data:`LOG4J_VERSION`: the POM brings none, and without one a
broker that fails prints nothing), resolved once with Maven into a cache outside the tree
(``TRIAGE_KAFKA_CACHE``, default ``$XDG_CACHE_HOME/triage`` or ``~/.cache/triage``), one
folder per version; ``make venv`` does it (``python -m triage.bus.apache_kafka resolve``), so
a start later takes seconds. Needs Java 17 or later (``JAVA_HOME``, else ``java`` on the path)
and, for the first resolution only, Maven (``mvn``).

**A broker.** :class:`ApacheKafka` picks free loopback ports for its client and controller
listeners and a data directory of its own, formats the storage with
``kafka.tools.StorageTool format --standalone``, starts ``kafka.Kafka`` with a small heap and the
settings of a one-node test cluster (replication factors 1, ``group.initial.rebalance.delay.ms=0``,
one partition for the group offsets and the transactions' state), is ready when it answers a
metadata request, and is stopped (SIGTERM, then SIGKILL) and its data removed on exit; started
from the main thread on Linux, it also dies (SIGKILL) when this process is killed
(:func:`~triage.bus.embedded.die_with_parent`; its temporary data folder stays then). Its log
is kept at ``log_path`` for a failing test. Same interface as
:class:`~triage.bus.embedded.EmbeddedBroker`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from triage.bus.embedded import (
    BrokerStartError,
    broker_answers,
    die_with_parent,
    free_port,
    port_in_use,
)
from triage.bus.errors import ConfigurationError
from triage.bus.tempdirs import QUIET_S, owned_tempdir, remove_orphaned

KAFKA_VERSION = "4.1.1"       # org.apache.kafka:kafka_2.13 (KRaft only, Java 17+)
LOG4J_VERSION = "2.25.3"      # org.apache.logging.log4j:log4j-slf4j-impl (Kafka logs via SLF4J 1.7)
DEPENDENCY_PLUGIN = "3.8.1"   # org.apache.maven.plugins:maven-dependency-plugin
MIN_JAVA = 17
HEAP_MB = 512

_POM = f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by triage (bus/apache_kafka.py) to fetch Apache Kafka's broker and its
     dependencies from Maven Central; the versions are pinned there. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>triage</groupId>
  <artifactId>apache-kafka-broker</artifactId>
  <version>{KAFKA_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{KAFKA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_VERSION}</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>{DEPENDENCY_PLUGIN}</version>
      </plugin>
    </plugins>
  </build>
</project>
"""

# The broker's own log: warnings and errors of Kafka, startup and shutdown lines at INFO.
_LOG4J = """status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = out
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = INFO
"""


class KafkaUnavailable(ConfigurationError):
    """Apache Kafka cannot be started here: no Java 17+, or its jars cannot be fetched."""


def cache_dir() -> Path:
    """Where the jars of :data:`KAFKA_VERSION` are kept (module docstring)."""
    base = os.environ.get("TRIAGE_KAFKA_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "triage")
    return Path(base) / f"apache-kafka-{KAFKA_VERSION}"


def java_binary() -> str:
    """The ``java`` to run Kafka with: ``$JAVA_HOME/bin/java``, else ``java`` on the path.

    Raises :class:`KafkaUnavailable`, saying what to install, if there is none or it is older
    than Java 17."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise KafkaUnavailable(
            f"Apache Kafka needs Java {MIN_JAVA} or later and none was found: install a JDK or "
            "JRE (Debian: apt-get install openjdk-17-jre-headless; or Temurin) or set JAVA_HOME")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KafkaUnavailable(f"{java} -version failed: {exc}") from None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    major = int(found.group(1)) if found else 0
    if major == 1 and found and found.group(2):  # "1.8.0_392": Java 8
        major = int(found.group(2))
    if major < MIN_JAVA:
        raise KafkaUnavailable(
            f"Apache Kafka {KAFKA_VERSION} needs Java {MIN_JAVA} or later; {java} is Java "
            f"{major or 'of an unknown version'}: install a newer JDK or set JAVA_HOME to one")
    return java


def resolve_jars(*, quiet: bool = True) -> Path:
    """The folder of the broker's jars, fetched with Maven the first time (module docstring).
    Safe to call from several processes at once: each fetches into a folder of its own and
    the first to finish installs it.

    Raises :class:`KafkaUnavailable` if Maven is missing or the fetch fails."""
    home = cache_dir()
    jars = home / "jars"
    if (home / "complete").exists() and jars.is_dir():
        return jars
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaUnavailable(
            f"fetching Apache Kafka {KAFKA_VERSION}'s jars once needs Maven (mvn): install it "
            "(Debian: apt-get install maven), or set TRIAGE_BOOTSTRAP_SERVERS to a running "
            "Kafka")
    home.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fetch-", dir=home))
    try:
        (work / "pom.xml").write_text(_POM)
        command = [mvn, "-B", *(["-q"] if quiet else []), "-f", str(work / "pom.xml"),
                   "dependency:copy-dependencies", f"-DoutputDirectory={work / 'jars'}",
                   "-DincludeScope=runtime"]
        done = subprocess.run(command, capture_output=quiet, text=True, timeout=900)
        if done.returncode != 0:
            tail = (done.stdout or "")[-1500:] if quiet else ""
            raise KafkaUnavailable(f"Maven could not fetch Apache Kafka {KAFKA_VERSION} "
                                   f"(exit {done.returncode}): {tail}")
        with contextlib.suppress(OSError):  # another process installed it first: use theirs
            (work / "jars").rename(jars)
            (work / "pom.xml").rename(home / "pom.xml")
        (home / "log4j2.properties").write_text(_LOG4J)
        (home / "complete").write_text(f"kafka_2.13 {KAFKA_VERSION}\n")
    except subprocess.TimeoutExpired:
        raise KafkaUnavailable("Maven took over 15 minutes to fetch Apache Kafka") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return jars


def unavailable_reason() -> str | None:
    """Why Apache Kafka cannot be started here (no Java 17+, no jars and no Maven), or None."""
    try:
        java_binary()
        resolve_jars()
    except KafkaUnavailable as exc:
        return str(exc)
    return None


def cluster_id() -> str:
    """A new KRaft cluster id: 16 random bytes, URL-safe base64 without padding (what
    ``kafka-storage.sh random-uuid`` prints). Like Kafka's own ``Uuid.randomUuid``, never one
    starting with ``-``: StorageTool would read it as an option (1 start in 64 failed so)."""
    while True:
        found = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not found.startswith("-"):
            return found


# A broker's own data directory: DATA_PREFIX* in the temporary directory (bus/tempdirs.py).
DATA_PREFIX = "triage-kafka-"


def remove_orphaned_data(tmp: Path | None = None, quiet_s: float = QUIET_S) -> list[Path]:
    """Remove the data directories of brokers whose owning process is gone (a SIGKILLed
    ``triage broker --kafka`` cannot remove its own; its broker died with it) and that nothing
    changed for ``quiet_s`` (bus/tempdirs.py). Returns what was removed."""
    return remove_orphaned(DATA_PREFIX, tmp, quiet_s)


@dataclass
class ApacheKafka:
    """A single-node KRaft Apache Kafka on loopback (module docstring). Use as a context
    manager or call start()/stop(). ``port``: the client listener (0: a free one);
    ``data_dir``: where its log segments go (None: a temporary folder, removed on stop);
    ``log_path``: the broker's output (None: discarded); ``properties``: more (or other)
    ``server.properties`` settings."""

    port: int = 0
    data_dir: Path | None = None
    log_path: Path | None = None
    heap_mb: int = HEAP_MB
    properties: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    controller_port: int = 0
    _owned_dir: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def server_properties(self, log_dir: Path) -> dict[str, str]:
        """The broker's settings: one node, both roles, replication factors 1."""
        return {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
                         f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(log_dir),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            # One partition each (the defaults are 50): created at the first group or
            # transaction, they are then ready in a fraction of the time.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            **self.properties,
        }

    def start(self, timeout_s: float = 90.0) -> str:
        """Format the storage, start the broker and wait until it answers a metadata
        request; returns its address.

        Raises :class:`KafkaUnavailable` (no Java 17+, no jars) or
        :class:`~triage.bus.embedded.BrokerStartError` (the port is taken, the broker exits
        or does not answer within ``timeout_s``; the message ends with its log's last
        lines)."""
        java = java_binary()
        jars = resolve_jars()
        if not self.port:
            self.port = free_port()
        elif port_in_use(self.port):
            raise BrokerStartError(
                f"port {self.port} on 127.0.0.1 is already in use by another process; choose "
                "a free one or leave --port out to get one")
        self.controller_port = self.controller_port or free_port()
        if self.data_dir is None:
            self._owned_dir = self.data_dir = owned_tempdir(DATA_PREFIX)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "server.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in
                                  self.server_properties(self.data_dir / "logs").items()))
        base = [java, f"-Dlog4j2.configurationFile={jars.parent / 'log4j2.properties'}",
                "-cp", f"{jars}/*"]
        if not (self.data_dir / "logs" / "meta.properties").exists():
            formatted = subprocess.run(
                [*base, "-Xmx128m", "kafka.tools.StorageTool", "format", "--standalone",
                 "-t", cluster_id(), "-c", str(config)],
                capture_output=True, text=True, timeout=120)
            if formatted.returncode != 0:
                raise BrokerStartError("kafka.tools.StorageTool format failed: "
                                       + (formatted.stdout + formatted.stderr)[-1500:])
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(self.log_path, "ab")) if self.log_path \
                else subprocess.DEVNULL
            self.process = subprocess.Popen(
                [*base, f"-Xmx{self.heap_mb}m", f"-Xms{min(self.heap_mb, 256)}m",
                 "-XX:+UseSerialGC", "kafka.Kafka", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it,
                preexec_fn=die_with_parent())  # and it dies with us, even of a SIGKILL
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise BrokerStartError(f"Apache Kafka exited with code {code} while starting "
                                       f"on {self.bootstrap}{self._log_tail()}")
            if broker_answers(self.bootstrap, timeout_s=0.5):
                return self.bootstrap
            time.sleep(0.1)
        self.stop()
        raise BrokerStartError(f"Apache Kafka did not answer on {self.bootstrap} within "
                               f"{timeout_s:.0f} s{self._log_tail()}")

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()[-15:]
        return f"; the end of {self.log_path}:\n" + "\n".join(lines)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (a controlled shutdown, a few seconds), SIGKILL past ``timeout_s``; then the
        data directory goes if this object made it."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = self.data_dir = None

    def __enter__(self) -> ApacheKafka:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m triage.bus.apache_kafka resolve``: fetch the jars (``make venv`` runs it);
    exits 0 when they are there, 2 with the reason when they cannot be."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["resolve"]:
        print("usage: python -m triage.bus.apache_kafka resolve", file=sys.stderr)
        return 2
    try:
        java_binary()
        jars = resolve_jars(quiet=True)
    except KafkaUnavailable as exc:
        print(f"Apache Kafka is not available here: {exc}", file=sys.stderr)
        return 2
    print(f"Apache Kafka {KAFKA_VERSION}: {len(list(jars.glob('*.jar')))} jars in {jars}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
