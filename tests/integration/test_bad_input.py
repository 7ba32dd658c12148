"""Bad input on a real broker: every record consumed ends as exactly one prediction or one
dead letter, counted by offsets; the worker never crashes; the DLQ tools re-drive fixed records.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from tests.helpers import PoisonedInventory, run_scorer
from triage.bus.clients import make_producer
from triage.bus.deadletter import headers_dict
from triage.bus.offsets import committed_offsets
from triage.consumer import deadletter_topic as dlq
from triage.consumer.reader import TopicReader
from triage.consumer.scorer import Scorer
from triage.model import artifact
from triage.model.orders import read_orders_csv
from triage.model.reference import ReferenceTables
from triage.schemas.codec import Codec, codec_for
from triage.settings import Settings

TOTAL = 20_000
PER_KIND = 200  # 11 kinds x 200 = 2,200 bad records, 11% of the stream
DAY_MS = 86_400_000


def bad_records(settings: Settings, good: list[dict], rng: np.random.Generator
                ) -> dict[str, list[bytes | None]]:
    """PER_KIND records of each failure kind, keyed by the DLQ reason they must get."""
    codec = Codec("order")
    now = int(time.time() * 1000)

    def order(i: int, **change) -> bytes:
        return codec.encode({**good[i % len(good)], "order_id": f"BAD-{i}", **change})

    prediction = Codec("prediction").encode({
        "order_id": "x", "customer_id": "y", "recommendation": "Deliver", "probabilities": {},
        "model_version": "v", "features": {"order_hour_of_day": 1, "inventory": None,
                                           "payment_status": "OK", "zip_code_available": True},
        "order_timestamp_ms": 0, "scored_at_ms": 0, "order_published_at_ms": 0,
        "order_partition": 0, "order_offset": 0})
    n = range(PER_KIND)
    return {
        "unknown_framing": [b"\x7f" + rng.bytes(int(rng.integers(0, 60))) for _ in n],
        "invalid_avro": [order(i)[: int(rng.integers(11, 20))] for i in n],     # truncated
        "unknown_schema": [prediction if i % 2 else b"\xc3\x01" + rng.bytes(8) + order(i)[10:]
                           for i in n],                                      # another schema
        "no_registry": [b"\x00" + (1000 + i).to_bytes(4, "big") + order(i)[10:] for i in n],
        "tombstone": [None for _ in n],
        "oversized": [order(i, customer_id="C" * settings.core.max_message_bytes) for i in n],
        "missing_field": [order(i, sku_code=["", " ", "\t"][i % 3]) for i in n],
        "invalid_field": [order(i, zip_code=["1\x00", "9" * 500, " 10001", "\u200b"][i % 4])
                          for i in n],
        "invalid_timestamp": [order(i, timestamp_ms=[0, 946_684_799_999, now + 3 * DAY_MS,
                                                     2**62][i % 4]) for i in n],
        "scoring_failed": [order(i, sku_code="POISON") for i in n],
    }


def test_every_record_ends_as_one_prediction_or_one_dead_letter(
        settings: Settings, history: Path, model_dir: Path) -> None:
    rng = np.random.default_rng(4)
    good = read_orders_csv(history / "orders.csv").records()
    bad = bad_records(settings, good, rng)
    n_good = TOTAL - sum(len(v) for v in bad.values())
    stream = [(r["order_id"].encode(), Codec("order").encode(r)) for r in good[:n_good]]
    stream += [(f"bad-{kind}-{i}".encode(), value)
               for kind, values in bad.items() for i, value in enumerate(values)]
    stream = [stream[i] for i in rng.permutation(len(stream))]

    producer = make_producer(settings.connection)
    offsets: dict[tuple[int, int], bytes] = {}

    def delivered(err, msg) -> None:
        assert err is None, err
        offsets[(msg.partition(), msg.offset())] = msg.key()

    for key, value in stream:
        producer.produce(settings.topics.orders_topic, key=key, value=value, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(60) == 0 and len(offsets) == TOTAL

    history_reference = ReferenceTables.load(history)
    reference = ReferenceTables(
        history_reference.streams.values(),
        {**history_reference.tables,
         "inventory": PoisonedInventory(history_reference.tables["inventory"])},
        history_reference.vocabularies)
    scorer = Scorer(settings, artifact.load(model_dir), reference)
    dead_lettered = run_scorer(scorer, TOTAL)

    assert dead_lettered == Counter({kind: len(values) for kind, values in bad.items()})
    with TopicReader(settings.connection, settings.topics.predictions_topic,
                     "prediction") as reader:
        predicted = {(p["order_partition"], p["order_offset"]): p["order_id"]
                     for _, p in reader.read(idle_s=2)}
    with TopicReader(settings.connection, settings.topics.dlq_topic, None) as reader:
        letters = [(msg, headers_dict(msg.headers())) for msg, _ in reader.read(idle_s=2)]
    dead = {(int(h["__connect.errors.partition"]), int(h["__connect.errors.offset"])): msg
            for msg, h in letters}

    assert len(predicted) == n_good and len(dead) == TOTAL - n_good  # no offset twice
    assert predicted.keys() | dead.keys() == offsets.keys()
    assert not predicted.keys() & dead.keys()
    assert set(predicted.values()) == {r["order_id"] for r in good[:n_good]}
    sent = dict(stream)
    for (partition, offset), msg in dead.items():  # original key and bytes, untouched
        assert msg.key() == offsets[(partition, offset)]
        assert msg.value() == sent[msg.key()]
    headers = letters[0][1]
    for name in ("topic", "partition", "offset", "timestamp", "exception.class.name",
                 "exception.message", "task.id"):
        assert f"__connect.errors.{name}" in headers


def test_dlq_replay_redrives_fixed_records_to_predictions(
        settings: Settings, history: Path, model_dir: Path) -> None:
    """Orders from a producer whose clock runs two days ahead are dead-lettered; after the
    bound is widened, `dlq replay --reason invalid_timestamp` turns them into predictions."""
    good = read_orders_csv(history / "orders.csv", limit=300).records()
    ahead = int(time.time() * 1000) + 2 * DAY_MS
    skewed = [{**r, "timestamp_ms": ahead} for r in good[:200]]
    producer = make_producer(settings.connection)
    codec = Codec("order")
    for r in skewed:
        producer.produce(settings.topics.orders_topic, key=r["order_id"].encode(),
                         value=codec.encode(r))
    for i in range(50):
        producer.produce(settings.topics.orders_topic, key=b"junk", value=b"junk %d" % i)
    assert producer.flush(30) == 0

    model, reference = artifact.load(model_dir), ReferenceTables.load(history)
    assert run_scorer(Scorer(settings, model, reference), 250) == Counter(
        {"invalid_timestamp": 200, "unknown_framing": 50})
    report = dlq.inspect(settings, idle_s=2)
    assert report.counts == Counter({"invalid_timestamp": 200, "unknown_framing": 50})
    assert report.samples["invalid_timestamp"][0]["order"]["timestamp_ms"] == ahead
    assert "head" in report.samples["unknown_framing"][0]

    fixed = settings.replace(max_future_seconds=3 * 86_400)
    summary = dlq.replay(fixed, reason="invalid_timestamp", idle_s=2)
    assert (summary.republished, summary.skipped, summary.failed) == (200, 50, 0)
    scorer = Scorer(fixed, model, reference)
    assert run_scorer(scorer, 200) == Counter()
    assert scorer.stats.predicted == 200
    with TopicReader(settings.connection, settings.topics.predictions_topic,
                     "prediction") as reader:
        predicted = {p["order_id"] for _, p in reader.read(idle_s=2)}
    assert predicted == {r["order_id"] for r in skewed}


def test_a_registry_outage_stops_the_worker_and_loses_nothing(
        settings: Settings, history: Path, model_dir: Path) -> None:
    """Registry-framed orders while the Schema Registry does not answer are not bad input: the
    worker process exits 1 (the supervisor restarts that, unlike a configuration error's 2),
    dead-letters nothing and commits nothing; once the registry answers, every order is
    predicted."""
    good = read_orders_csv(history / "orders.csv", limit=300).records()
    online = settings.replace(schema_registry_url="mock://bad-input-registry")
    codec = codec_for(online.connection, "order", online.topics.orders_topic)
    producer = make_producer(settings.connection)
    for r in good:
        producer.produce(settings.topics.orders_topic, key=r["order_id"].encode(),
                         value=codec.encode(r))
    assert producer.flush(30) == 0

    with socket.socket() as sock:  # a port nothing listens on: the registry is down
        sock.bind(("127.0.0.1", 0))
        down_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(settings.replace(schema_registry_url=down_url).to_env())
    worker = subprocess.run(
        [sys.executable, "-m", "triage.consumer.worker", "--model", str(model_dir),
         "--reference", str(history)], env=env, capture_output=True, text=True, timeout=180)
    assert worker.returncode == 1, worker.stdout[-2000:] + worker.stderr[-2000:]
    assert "worker_failed" in worker.stdout + worker.stderr
    assert "Schema Registry" in worker.stdout + worker.stderr
    committed = committed_offsets(settings.connection, settings.scorer.group_id,
                                  settings.topics.orders_topic)
    assert all(offset is None for offset in committed.values()), committed
    with TopicReader(settings.connection, settings.topics.dlq_topic, None) as reader:
        assert list(reader.read(idle_s=2)) == []

    model, reference = artifact.load(model_dir), ReferenceTables.load(history)
    assert run_scorer(Scorer(online, model, reference), len(good)) == Counter()
    with TopicReader(online.connection, online.topics.predictions_topic, "prediction") as reader:
        predicted = {p["order_id"] for _, p in reader.read(idle_s=2)}
    assert predicted == {r["order_id"] for r in good}

