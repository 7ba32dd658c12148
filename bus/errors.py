"""The one root of every error triage raises on purpose, and what each kind means for a process.

* :class:`ConfigurationError`: the settings, a file or the data given are not usable. Fixing
  them is the only cure, so a process exits with status 2 and its supervisor does not restart
  it (a restart would fail the same way).
* :class:`InfrastructureError`: the broker, the Schema Registry or a worker did not do its part.
  The same input may work later: a process exits with status 1 and is restarted with backoff.
* :class:`BadRecord`: one record is at fault and nothing else. The scorer dead-letters it with
  :attr:`BadRecord.reason` and goes on; it never ends a process.

Anything else that escapes is a bug: commands and workers log it with its traceback and exit 1
(:func:`exit_status`), never with a raw traceback as their last word.
"""

from __future__ import annotations

from confluent_kafka import KafkaException

EXIT_OK = 0
EXIT_INFRASTRUCTURE = 1
EXIT_CONFIGURATION = 2


class TriageError(Exception):
    """The root: every error this project raises on purpose derives from it."""


class ConfigurationError(TriageError):
    """Settings, files or data that cannot be used; exit status 2, not restarted."""


class InfrastructureError(TriageError):
    """A broker, registry or process that did not do its part; exit status 1, restarted."""


class PortInUse(ConfigurationError):
    """A port this process was told to listen on is taken by another process."""

    def __init__(self, port: int, what: str, setting: str) -> None:
        super().__init__(f"port {port} ({what}) is already in use by another process: choose "
                         f"a free one with {setting}")
        self.port = port


class WaitTimeout(InfrastructureError, TimeoutError):
    """Waited longer than allowed for the broker or the workers (nothing arrived, nothing
    settled). Also a TimeoutError."""


class BadRecord(TriageError):
    """One record cannot be scored; it is dead-lettered with ``reason`` (short, for machines:
    a header value and a metric label), ``str(error)`` saying what exactly was wrong."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def exit_status(error: BaseException) -> int:
    """The exit status a process ends with because of ``error``: 2 for a configuration error,
    1 for everything else (infrastructure, librdkafka's KafkaException, and bugs)."""
    if isinstance(error, ConfigurationError):
        return EXIT_CONFIGURATION
    if isinstance(error, InfrastructureError | KafkaException):
        return EXIT_INFRASTRUCTURE
    return EXIT_INFRASTRUCTURE


def is_expected(error: BaseException) -> bool:
    """False for a bug: an exception that is neither one of ours nor librdkafka's."""
    return isinstance(error, TriageError | KafkaException)
