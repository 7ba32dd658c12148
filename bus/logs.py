"""structlog set-up shared by every command: JSON lines for services, console for people.

librdkafka's own log lines (connection failures, purged events on close, ...) go through the
same structlog pipeline: every Kafka client gets :func:`librdkafka_logger` as its ``logger``
(bus/clients.py), so that with ``TRIAGE_LOG_FORMAT=json`` every line on stderr is JSON.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable

import structlog

LIBRDKAFKA_EVENT = "librdkafka"
# A librdkafka line said again within this many seconds, by any client of the process, is
# counted instead of written: a worker whose brokers do not answer has a dozen clients each
# retrying every second (768 lines in 26 s, seen by a new user). The next one after the window
# carries ``repeated``, the count dropped.
REPEAT_WINDOW_S = 60.0
_SEEN_KEYS = 256
# librdkafka's timing and suppression counts, which differ between repeats of one failure.
_TIMING = re.compile(r"\s*\(after \d+ms in state \w+(?:, \d+ identical error\(s\) suppressed)?\)"
                     r"|\s*\(\d+ identical error\(s\) suppressed\)")
_LIBRDKAFKA_LOGGER = "triage.librdkafka"
_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """Configure structlog: ``fmt`` "json" (one JSON object a line) or "console"; lines below
    ``level`` (debug, info, warning, error) are dropped. Every line goes to the current
    ``sys.stderr``. librdkafka's log lines (see :func:`librdkafka_logger`) follow the same
    format and level."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        # sys.stderr as it is when a line is written, not when this ran: a replaced stream
        # (a test's capture, a closed terminal) must not break every later line. WriteLogger
        # writes a line and its newline in one write() (print() makes two), so the lines of
        # processes sharing a pipe (a supervisor and its workers) do not run into each other
        # (seen: two workers' stop_requested lines on one line); a pipe keeps writes of up to
        # PIPE_BUF (4,096 bytes on Linux) whole.
        logger_factory=lambda *_: structlog.WriteLogger(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


class StructlogHandler(logging.Handler):
    """A stdlib logging handler that re-emits each record of librdkafka through structlog, as
    the event ``librdkafka`` with ``facility`` (librdkafka's subsystem, e.g. ``FAIL``,
    ``BGQUEUE``), ``client`` (the client's name, e.g. ``rdkafka#consumer-1``) and ``message``.

    confluent-kafka calls ``logger.log(level, "%s [%s] %s", facility, client, message)`` with
    librdkafka's syslog level already mapped to a stdlib level (emerg/alert/crit -> CRITICAL,
    err -> ERROR, warning -> WARNING, notice/info -> INFO, debug -> DEBUG); the record is
    logged at that level, so structlog's level filter applies. A record of another shape (a
    caller logging to this logger itself) keeps its formatted text as ``message``. A line said
    within ``REPEAT_WINDOW_S`` before is counted, not written (``repeated`` on the next one).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        # (facility, message without its timing) -> (when last logged, repeats not logged)
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if isinstance(args, tuple) and len(args) == 3:
            facility, client, message = (str(a) for a in args)
        else:
            facility, client, message = "", "", record.getMessage()
        repeated = self._repeats(facility, message)
        if repeated is None:
            return
        # The nearest standard level at or below the record's (structlog knows only those).
        level = max((lv for lv in _LEVELS if lv <= record.levelno), default=logging.DEBUG)
        extra = {"repeated": repeated} if repeated else {}
        try:
            structlog.get_logger("triage").log(level, LIBRDKAFKA_EVENT, facility=facility,
                                               client=client, message=message, **extra)
        except Exception:  # a closed stream or a renderer error: stdlib logging's own path
            self.handleError(record)

    def _repeats(self, facility: str, message: str) -> int | None:
        """None to drop a line said within ``REPEAT_WINDOW_S`` (by any client of the process,
        its timing aside); else how many such lines were dropped since it was last said."""
        key = (facility, _TIMING.sub("", message))
        now = self.clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < REPEAT_WINDOW_S:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._seen) >= _SEEN_KEYS:
            self._seen.clear()  # many different lines: forget the old ones
        self._seen[key] = (now, 0)
        return last[1] if last is not None else 0


def librdkafka_logger() -> logging.Logger:
    """The ``logging.Logger`` given to every Kafka client as its ``logger`` property: one
    :class:`StructlogHandler`, not propagated to the root logger (so that nothing prints a
    record twice). The same object on every call.

    A client with a ``logger`` no longer writes to stderr itself: librdkafka queues its log
    lines, and they come out only when the client is served, i.e. from ``poll()``,
    ``consume()``, ``flush()`` (and a consumer's ``close()``). A client that is never polled
    (an AdminClient used for one request, a consumer only asked for watermarks) drops its lines
    when it is destroyed; call ``poll(0)`` on an AdminClient or a Producer after its requests
    to have them logged."""
    logger = logging.getLogger(_LIBRDKAFKA_LOGGER)
    if not any(isinstance(h, StructlogHandler) for h in logger.handlers):
        logger.addHandler(StructlogHandler())
        logger.setLevel(logging.DEBUG)  # structlog's filter decides
        logger.propagate = False
    return logger
