"""Validation of decoded orders: the first check hook every worker runs.

An order is rejected (dead-lettered with the reason) when:

* a field is empty or blank (``missing_field``);
* an id, ``sku_code`` or ``zip_code`` has characters that are not printable, surrounding
  white space, or more than ``TRIAGE_MAX_FIELD_LENGTH`` characters (``invalid_field``);
* its timestamp is before ``TRIAGE_EARLIEST_ORDER_TIME`` (2000-01-01) or more than
  ``TRIAGE_MAX_FUTURE_SECONDS`` (one day) ahead of the worker's clock (``invalid_timestamp``).

An unknown SKU or zip code is **not** invalid: it is a business case (no stock, not served)
and the model scores it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from triage.scoring.hooks import Rejection
from triage.scoring.settings import ValidationSettings

STRING_FIELDS = ("order_id", "customer_id", "sku_code", "zip_code")


class OrderValidator:
    name = "validation"

    def __init__(self, settings: ValidationSettings) -> None:
        self.max_length = settings.max_field_length
        self.earliest_ms = settings.earliest_order_ms
        self.max_future_ms = settings.max_future_seconds * 1000

    def problem(self, order: dict[str, Any], now_ms: int) -> tuple[str, str] | None:
        """(reason, message) for the first thing wrong with ``order``, or None."""
        limit = self.max_length
        for name in STRING_FIELDS:
            value = order[name]
            # The usual case, in one expression: what text_problem accepts (a non-empty value
            # equal to its strip() is not blank).
            if value and len(value) <= limit and value.isprintable() and value.strip() == value:
                continue
            found = self.text_problem(name, value)
            if found is not None:
                return found
        ts = order["timestamp_ms"]
        if self.earliest_ms <= ts <= now_ms + self.max_future_ms:
            return None
        return self.time_problem("timestamp_ms", ts, now_ms)

    def text_problem(self, name: str, value: str) -> tuple[str, str] | None:
        """An id or code that is empty, too long, unprintable or padded: (reason, message)."""
        if not value or value.isspace():
            return "missing_field", f"{name} is empty"
        if len(value) > self.max_length:
            return "invalid_field", f"{name} has {len(value)} characters, most allowed " \
                                    f"{self.max_length}"
        if not value.isprintable() or value != value.strip():
            return "invalid_field", f"{name} {value[:40]!r} has unprintable characters or " \
                                    "surrounding white space"
        return None

    def time_problem(self, name: str, ts: int, now_ms: int | None) -> tuple[str, str] | None:
        """A time (UTC ms) before the earliest allowed, or (unless ``now_ms`` is None) too far
        ahead of the clock: (reason, message)."""
        if ts < self.earliest_ms:
            return "invalid_timestamp", f"{name} {ts} is before the earliest allowed " \
                                        f"{self.earliest_ms}"
        if now_ms is not None and ts > now_ms + self.max_future_ms:
            return "invalid_timestamp", f"{name} {ts} is more than " \
                                        f"{self.max_future_ms // 1000} s in the future"
        return None

    def check(self, orders: list[dict[str, Any]]) -> Iterator[Rejection]:
        now_ms = int(time.time() * 1000)
        for index, order in enumerate(orders):
            found = self.problem(order, now_ms)
            if found is not None:
                yield Rejection(index, *found)
