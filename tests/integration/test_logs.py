"""Logging: librdkafka's own log lines go through structlog, so that with JSON logs every line a
process writes to stderr is JSON (a new user saw raw ``%6|...|BGQUEUE|...`` lines in
``triage demo``'s output). Unit tier: no broker; a client pointed at a closed port makes
librdkafka log at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from triage.bus.embedded import free_port

# The child: JSON logging from the settings, a consumer configured as every consumer is
# (bus/clients.py) on a port nobody listens on, polled until librdkafka's first log record
# reaches the logger the clients are given (or a deadline), then closed. It prints whether
# a record arrived; everything on its stderr is what the test judges.
CHILD = """
import logging, os, sys, time
from triage.bus.clients import make_consumer
from triage.bus.logs import configure_logging, librdkafka_logger
from triage.settings import Settings

settings = Settings.from_env(os.environ)
configure_logging(settings.log_format, settings.log_level)
arrived = []

class Seen(logging.Handler):
    def emit(self, record):
        arrived.append(record)

librdkafka_logger().addHandler(Seen())
consumer = make_consumer(settings.connection, "triage-test-logs")
deadline = time.monotonic() + 30
while not arrived and time.monotonic() < deadline:
    consumer.poll(0.1)
consumer.close()
print("arrived" if arrived else "nothing arrived")
"""


def test_librdkafka_log_lines_are_json_lines_of_the_structured_log(tmp_path: Path) -> None:
    env = {**os.environ, "TRIAGE_LOG_FORMAT": "json", "TRIAGE_LOG_LEVEL": "info",
           "TRIAGE_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # nobody listens there
           "TRIAGE_STATE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "arrived", done.stderr[-3000:]
    lines = done.stderr.splitlines()
    not_json = []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            not_json.append(line)
    assert not not_json, f"lines of stderr that are not JSON: {not_json[:5]}"
    librdkafka = [e for e in events if e.get("event") == "librdkafka"]
    assert librdkafka, f"no librdkafka event among {events[:5]}"
    refused = [e for e in librdkafka if e["facility"] == "FAIL"]
    assert refused, librdkafka[:5]
    # librdkafka logs a refused connection at syslog level 3 (err): logged as an error, with
    # the client's name and librdkafka's text.
    assert refused[0]["level"] == "error"
    assert refused[0]["client"] == "triage#consumer-1"  # client.id, then librdkafka's count
    assert "Connection refused" in refused[0]["message"]
    assert {"timestamp", "level"} <= refused[0].keys()


def test_a_worker_whose_brokers_do_not_answer_says_so_in_one_line_and_exits_1(
        tmp_path: Path, model_dir: Path) -> None:
    """Found by a new user: against an address nobody listens on, `triage worker` said nothing
    for 16 s, then wrote 768 lines of librdkafka's connection failures and an error naming no
    address. Now: its first metadata request fails, it says where it looked and what to check,
    and librdkafka's repeats are counted, not written."""
    nobody = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update({"TRIAGE_BOOTSTRAP_SERVERS": f"127.0.0.1:{nobody}",
                "TRIAGE_STATE_DIR": str(tmp_path), "TRIAGE_LOG_FORMAT": "json"})
    result = subprocess.run([sys.executable, "-m", "triage.cli", "worker", "--model",
                             str(model_dir)], env=env, capture_output=True, text=True,
                            timeout=120)
    events = [json.loads(line) for line in (result.stdout + result.stderr).splitlines()
              if line.startswith("{")]
    assert result.returncode == 1, result.stderr[-2000:]
    failed = [e for e in events if e["event"] == "worker_failed"]
    assert len(failed) == 1 and f"127.0.0.1:{nobody}" in failed[0]["error"], failed
    assert "TRIAGE_BOOTSTRAP_SERVERS" in failed[0]["error"]
    said = [(e["facility"], e["message"].split(" (after")[0]) for e in events
            if e["event"] == "librdkafka"]
    assert len(said) == len(set(said)), said  # each failure once
