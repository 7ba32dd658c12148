"""Dead-lettering: a record that cannot be scored goes, byte for byte, to the dead-letter topic.

Headers follow Kafka Connect's dead-letter convention (``__connect.errors.*``), so existing
DLQ tooling reads them; ``triage.errors.reason`` adds a short machine-readable reason.
"""

from __future__ import annotations

from confluent_kafka import Message

HEADER_PREFIX = "__connect.errors."


def dead_letter_headers(msg: Message, reason: str, error_class: str, message: str,
                        worker: str) -> list[tuple[str, bytes]]:
    _, timestamp = msg.timestamp()
    return [
        (HEADER_PREFIX + "topic", msg.topic().encode()),
        (HEADER_PREFIX + "partition", str(msg.partition()).encode()),
        (HEADER_PREFIX + "offset", str(msg.offset()).encode()),
        (HEADER_PREFIX + "timestamp", str(timestamp).encode()),
        (HEADER_PREFIX + "exception.class.name", error_class.encode()),
        (HEADER_PREFIX + "exception.message", message.encode()),
        (HEADER_PREFIX + "connector.name", b"triage-scorer"),
        (HEADER_PREFIX + "task.id", worker.encode()),
        ("triage.errors.reason", reason.encode()),
    ]


def headers_dict(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    return {k: (v or b"").decode(errors="replace") for k, v in headers or []}
