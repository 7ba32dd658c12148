"""Deterministic sampling for the drift topic.

An order is sampled when ``sha256(order_id)`` read as a fraction in [0, 1) is below the sample
rate: its first 8 bytes, big-endian, divided by 2**64. The same order is sampled (or not) by
every worker, on every redelivery, and by anyone who wants to check the topic.
"""

from __future__ import annotations

import hashlib

_SCALE = float(2**64)


def sample_fraction(order_id: str) -> float:
    return int.from_bytes(hashlib.sha256(order_id.encode()).digest()[:8], "big") / _SCALE


def sampled_indices(order_ids: list[str], rate: float) -> list[int]:
    if rate <= 0.0:
        return []
    return [i for i, order_id in enumerate(order_ids) if sample_fraction(order_id) < rate]
