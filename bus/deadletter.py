"""Dead-lettering: a record that cannot be scored goes, byte for byte, to the dead-letter topic.

Headers follow Kafka Connect's dead-letter convention (``__connect.errors.*``), so existing
DLQ tooling reads them; ``triage.errors.reason`` adds a short machine-readable reason.

A dead letter must itself be deliverable, or the record that caused it would stop its partition
for good (the worker would fail on it, restart, and fail again). :func:`fit_dead_letter` makes
it fit whatever its key, value and headers weigh: a header value over
:data:`MAX_HEADER_VALUE_BYTES` is cut, then, if the record is still too large, the key is
dropped, then the value, then both; what was cut or dropped is named in headers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from triage.bus.clients import Source
from triage.bus.errors import ConfigurationError

HEADER_PREFIX = "__connect.errors."
REASON_HEADER = "triage.errors.reason"
MAX_HEADER_VALUE_BYTES = 1_000
# Room for what a record costs beyond its key, value and header bytes: record and batch
# framing, varints per header (librdkafka's own estimate is well under this).
RECORD_OVERHEAD_BYTES = 1_024

Headers = list[tuple[str, bytes]]


def dead_letter_headers(source: Source, reason: str, error_class: str, message: str,
                        worker: str) -> Headers:
    """Kafka Connect's dead-letter headers for the record read at ``source``, plus ours."""
    return [
        (HEADER_PREFIX + "topic", source.topic.encode()),
        (HEADER_PREFIX + "partition", str(source.partition).encode()),
        (HEADER_PREFIX + "offset", str(source.offset).encode()),
        (HEADER_PREFIX + "timestamp", str(source.timestamp_ms).encode()),
        (HEADER_PREFIX + "exception.class.name", error_class.encode()),
        (HEADER_PREFIX + "exception.message", message.encode()),
        (HEADER_PREFIX + "connector.name", b"triage-scorer"),
        (HEADER_PREFIX + "task.id", worker.encode()),
        (REASON_HEADER, reason.encode()),
    ]


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """Bytes of a record's key, value and headers (names and values), without framing."""
    return (len(key or b"") + len(value or b"")
            + sum(len(name.encode()) + len(data or b"") for name, data in headers))


def fit_dead_letter(key: bytes | None, value: bytes | None, headers: Headers, limit: int
                    ) -> tuple[bytes | None, bytes | None, Headers]:
    """(key, value, headers) of a dead letter that a producer and topic accepting records of at
    most ``limit`` bytes take. Untouched when it fits; otherwise header values are cut to
    :data:`MAX_HEADER_VALUE_BYTES` (``triage.errors.truncated-headers`` names them), then the
    key is dropped (``triage.errors.original-key-bytes`` keeps its size), then the value
    (``triage.errors.original-bytes``), then both.

    Raises ConfigurationError if ``limit`` leaves no room for the headers alone (a configuration
    error: no dead letter could ever be sent)."""
    budget = limit - RECORD_OVERHEAD_BYTES
    if record_size(key, value, headers) <= budget:
        return key, value, headers
    cut = [name for name, data in headers if len(data or b"") > MAX_HEADER_VALUE_BYTES]
    headers = [(name, (data or b"")[:MAX_HEADER_VALUE_BYTES]) for name, data in headers]
    if cut:
        headers.append(("triage.errors.truncated-headers", ",".join(cut).encode()))
    key_note = ("triage.errors.original-key-bytes", str(len(key or b"")).encode())
    value_note = ("triage.errors.original-bytes", str(len(value or b"")).encode())
    for candidate in ((key, value, headers),
                      (None, value, [*headers, key_note]),
                      (key, None, [*headers, value_note]),
                      (None, None, [*headers, key_note, value_note])):
        if record_size(*candidate) <= budget:
            return candidate
    raise ConfigurationError(f"a dead letter's headers alone exceed the {limit}-byte limit")


def headers_dict(headers: Sequence[tuple[str, str | bytes | None]] | Mapping[
        str, str | bytes | None] | None) -> dict[str, str]:
    """Record headers (as librdkafka returns them) as text, undecodable bytes replaced."""
    items = headers.items() if isinstance(headers, Mapping) else headers or []
    return {k: v if isinstance(v, str) else (v or b"").decode(errors="replace")
            for k, v in items}
