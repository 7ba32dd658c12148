"""bus/logs.py StructlogHandler: a librdkafka line said again within REPEAT_WINDOW_S, by any
client, its timing aside, is counted instead of written; the next one after the window says how
many were dropped."""

from __future__ import annotations

import logging

import pytest
from structlog.testing import capture_logs

from triage.bus.logs import REPEAT_WINDOW_S, StructlogHandler


def _record(client: str, message: str) -> logging.LogRecord:
    return logging.LogRecord("triage.librdkafka", logging.ERROR, "", 0, "%s [%s] %s",
                             ("FAIL", client, message), None)


def test_a_repeated_librdkafka_line_is_written_once_a_window_with_the_count_dropped() -> None:
    now = [0.0]
    handler = StructlogHandler(clock=lambda: now[0])
    refused = "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused"
    with capture_logs() as logs:
        for i in range(50):  # a dozen clients retrying, timings differing
            handler.emit(_record(f"rdkafka#consumer-{i % 12}",
                                 f"{refused} (after {i}ms in state CONNECT)"))
        handler.emit(_record("rdkafka#producer-1", "another failure"))
        now[0] = REPEAT_WINDOW_S + 1
        handler.emit(_record("rdkafka#consumer-3",
                             f"{refused} (after 0ms in state CONNECT, 4 identical error(s) "
                             "suppressed)"))
    assert [(e["message"][:len(refused)], e.get("repeated")) for e in logs] == [
        (refused, None), ("another failure", None), (refused, 49)]


def test_a_log_line_is_one_write_with_its_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes sharing a pipe (a supervisor and its workers) each write whole lines: print()
    wrote a line and its newline in two writes, and two workers' lines once ran into one."""
    import io
    import sys

    import structlog

    from triage.bus.logs import configure_logging

    class Writes(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def write(self, text: str) -> int:
            self.calls.append(text)
            return super().write(text)

    stream = Writes()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("json", "info")
    try:
        structlog.get_logger("test").info("stop_requested", reason="SIGTERM")
    finally:
        structlog.reset_defaults()
    assert len(stream.calls) == 1 and stream.calls[0].endswith("}\n"), stream.calls
