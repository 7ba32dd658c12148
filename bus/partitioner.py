"""The documented partitioner, to check where keyed records landed: Kafka's murmur2, as the Java
client's default partitioner and librdkafka's ``murmur2_random`` compute it.

``partition = (murmur2(key) & 0x7fffffff) % partitions`` (Apache Kafka,
``org.apache.kafka.common.utils.Utils.murmur2`` and ``toPositive``; librdkafka's
``rd_kafka_msg_partitioner_murmur2``). librdkafka's own default, ``consistent_random``, hashes
with CRC-32 and puts most keys elsewhere: a producer left at it is a *foreign* partitioner here.

Vectorised over a batch of keys with numpy (keys of one length at a time), since every payments
record is checked: about 0.3 us a key in batches of a thousand, against 4 us for a loop in
Python. confluent-kafka exposes no partitioner function, and no maintained library on PyPI does
(kafka-python's is a Python loop), so this is the one hash written here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_SEED = np.uint32(0x9747B28C)
_M = np.uint32(0x5BD1E995)


def murmur2(keys: Sequence[bytes]) -> np.ndarray:
    """uint32 murmur2 hash of each key (Kafka's seed 0x9747b28c), as the Java client computes
    it (its int32 result, read as unsigned)."""
    out = np.empty(len(keys), dtype=np.uint32)
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
    for length in np.unique(lengths).tolist():
        rows = np.flatnonzero(lengths == length)
        joined = b"".join(keys[i] for i in rows.tolist())
        data = np.frombuffer(joined, dtype=np.uint8).reshape(len(rows), length)
        out[rows] = _murmur2_fixed(data, length)
    return out


def _murmur2_fixed(data: np.ndarray, length: int) -> np.ndarray:
    """murmur2 of the rows of ``data``, (n, length) uint8, all keys of ``length`` bytes."""
    with np.errstate(over="ignore"):
        h = np.full(len(data), _SEED ^ np.uint32(length & 0xFFFFFFFF), dtype=np.uint32)
        whole = length // 4
        if whole:
            blocks = np.ascontiguousarray(data[:, :whole * 4]).view("<u4")
            for i in range(whole):
                k = blocks[:, i].astype(np.uint32) * _M
                k ^= k >> np.uint32(24)
                k *= _M
                h *= _M
                h ^= k
        tail = length % 4
        if tail:
            base = whole * 4
            if tail == 3:
                h ^= data[:, base + 2].astype(np.uint32) << np.uint32(16)
            if tail >= 2:
                h ^= data[:, base + 1].astype(np.uint32) << np.uint32(8)
            h ^= data[:, base].astype(np.uint32)
            h *= _M
        h ^= h >> np.uint32(13)
        h *= _M
        h ^= h >> np.uint32(15)
    return h


def partitions_for(keys: Sequence[bytes], partitions: int) -> np.ndarray:
    """int64 partition the documented partitioner gives each key, among ``partitions``."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, got {partitions}")
    hashes = murmur2(keys) & np.uint32(0x7FFFFFFF)
    return (hashes % np.uint32(partitions)).astype(np.int64)
