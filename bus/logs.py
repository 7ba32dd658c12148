"""structlog set-up shared by every command: JSON lines for services, console for people.

librdkafka's own log lines (connection failures, purged events on close, ...) go through the
same structlog pipeline: every Kafka client gets :func:`librdkafka_logger` as its ``logger``
(bus/clients.py), so that with ``TRIAGE_LOG_FORMAT=json`` every line on stderr is JSON.
"""

from __future__ import annotations

import logging
import sys

import structlog

LIBRDKAFKA_EVENT = "librdkafka"
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
        # (a test's capture, a closed terminal) must not break every later line.
        logger_factory=lambda *_: structlog.PrintLogger(file=sys.stderr),
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
    caller logging to this logger itself) keeps its formatted text as ``message``.
    """

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if isinstance(args, tuple) and len(args) == 3:
            facility, client, message = (str(a) for a in args)
        else:
            facility, client, message = "", "", record.getMessage()
        # The nearest standard level at or below the record's (structlog knows only those).
        level = max((lv for lv in _LEVELS if lv <= record.levelno), default=logging.DEBUG)
        try:
            structlog.get_logger("triage").log(level, LIBRDKAFKA_EVENT, facility=facility,
                                               client=client, message=message)
        except Exception:  # a closed stream or a renderer error: stdlib logging's own path
            self.handleError(record)


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
