"""The documented partitioner (bus/partitioner.py): Kafka's murmur2, held to the Java client's
own test vectors and to where librdkafka's murmur2_random really puts keys on a broker.

This half needs no broker and starts no process; tests/integration/test_partitioner.py has the
rest."""

from __future__ import annotations

import numpy as np
import pytest

from triage.bus.partitioner import murmur2, partitions_for

# org.apache.kafka.common.utils.UtilsTest#testMurmur2: key -> Utils.murmur2(key) (an int32).
JAVA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def test_murmur2_gives_the_java_clients_hashes() -> None:
    hashes = murmur2(list(JAVA_VECTORS)).astype(np.int64)
    signed = np.where(hashes >= 2**31, hashes - 2**32, hashes)
    assert signed.tolist() == list(JAVA_VECTORS.values())


def test_keys_of_every_length_in_one_batch() -> None:
    """Grouping by length keeps each key's own hash, whatever the batch around it."""
    keys = [b"", b"a", b"ab", b"abc", b"abcd", b"abcde", *JAVA_VECTORS]
    one_by_one = [int(murmur2([k])[0]) for k in keys]
    assert murmur2(keys).tolist() == one_by_one
    with pytest.raises(ValueError):
        partitions_for(keys, 0)
