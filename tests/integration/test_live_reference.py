"""The live reference join on a real broker: workers with no reference CSVs learn inventory,
payments and zip roll-outs from the topics, and every order's last revision has the features
pandas.merge_asof gives over the complete CSVs, while a first prediction that differs says so
(reference_wait_expired) or is corrected; when the streams come late, orders wait for them,
or, past the max wait, are scored flagged and corrected when the events land; a killed worker
restores and stays exact; bad reference records are dead-lettered; payments published by a
foreign partitioner are counted and joined right; a reference topic created after the workers
started is read."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tests.helpers import (
    LIVE_ORDERS,
    assert_never_silently_wrong,
    last,
    merge_asof_features,
    predictions,
)
from triage.bus.clients import create_topics, make_admin, make_producer
from triage.bus.deadletter import headers_dict
from triage.bus.offsets import committed_offsets
from triage.bus.partitioner import partitions_for
from triage.consumer.reader import TopicReader
from triage.consumer.supervisor import Supervisor
from triage.model.streams import reference_topic_partitions
from triage.producer.replay import replay
from triage.schemas.codec import Codec
from triage.settings import Settings

ORDERS = LIVE_ORDERS  # in the live_data fixture (tests/integration/conftest.py)


def start(settings: Settings, model_dir: Path, workers: int) -> Supervisor:
    """Workers with no reference CSVs (the live path), supervised in a thread, settled."""
    supervisor = Supervisor(settings, model_dir, None, workers=workers)
    supervisor.start()
    threading.Thread(target=supervisor.run, daemon=True).start()
    supervisor.wait_until_assigned(settings.topics.orders_partitions)
    return supervisor


def test_replaying_a_directory_gives_every_order_the_features_merge_asof_gives(
        settings: Settings, live_data: Path, model_dir: Path, expected: dict) -> None:
    settings = settings.replace(reference_max_wait_ms=60_000)  # exact, or the test fails
    supervisor = start(settings, model_dir, workers=2)
    try:
        since = int(time.time() * 1000)
        summary = replay(settings, live_data, progress=False)
        assert summary.failed == 0 and summary.by_stream["orders"] == ORDERS
        found = predictions(settings, set(expected), since)
        statuses = supervisor.statuses().values()  # readiness and tables, as workers report
        assert all(s["restored"] and s["reference_records"] > 0 for s in statuses)
    finally:
        supervisor.stop()
    assert_never_silently_wrong(found, expected)
    assert not any(r[0]["reference_wait_expired"] for r in found.values())


def test_orders_before_their_reference_data_wait_for_it_or_say_they_could_not(
        settings: Settings, live_data: Path, model_dir: Path, expected: dict) -> None:
    """The orders first, the reference streams 2 s later: still 100% (the orders waited).
    Then, on fresh topics, with a max wait of 1 s and the streams 4 s late: the orders are
    scored without them, flagged, none is lost, and when the streams land every order whose
    features they change is corrected (revision 2, late_reference), to merge_asof's.

    The first part's allowance (6 s) is well beyond the streams' 2 s: once one partition of
    a stream has a record, a partition whose fetch has not yet seen its first one is quiet,
    and a quiet partition holds an order only for the allowance (scoring/feed.py). With the
    default 2 s, equal to the delay, orders whose payments sat on such a partition were scored
    without them (and corrected) once under load."""
    settings = settings.replace(reference_max_wait_ms=60_000, reference_lateness_ms=6_000)
    supervisor = start(settings, model_dir, workers=1)
    try:
        since = int(time.time() * 1000)
        replay(settings, live_data, streams=["orders"], progress=False)
        time.sleep(2.0)  # the scenario: the reference streams come 2 s after the orders
        # Waiting orders are consumed but not committed: a crash now would read them again.
        committed = committed_offsets(settings.connection, settings.scorer.group_id,
                                      settings.topics.orders_topic)
        assert all(not offset for offset in committed.values()), committed
        replay(settings, live_data, streams=["payments", "inventory", "zip_codes"],
               progress=False)
        found = predictions(settings, set(expected), since)
    finally:
        supervisor.stop()
    assert all(records[0]["features"] == expected[o] for o, records in found.items())
    assert not any(r[0]["reference_wait_expired"] for r in found.values())
    assert all(last(records)["revision"] == 1 for records in found.values())

    late = settings.replace(**{name: f"{getattr(settings.topics, name)}-late" for name in (
        "orders_topic", "predictions_topic", "drift_topic", "dlq_topic", "reference_dlq_topic")},
        **{f"{s}_topic": f"{settings.topics.topic_of(s)}-late"
           for s in ("payments", "inventory", "zip_codes")},
        group_id=settings.scorer.group_id + "-late", reference_max_wait_ms=1_000,
        reference_lateness_ms=500)
    create_topics(late.connection, late.topics, reference_topic_partitions(late.topics))
    supervisor = start(late, model_dir, workers=1)
    try:
        since = int(time.time() * 1000)
        replay(late, live_data, streams=["orders"], progress=False)
        time.sleep(4.0)  # past the max wait: the orders are scored without the streams
        replay(late, live_data, streams=["payments", "inventory", "zip_codes"], progress=False)
        found = predictions(late, set(expected), since)
    finally:
        supervisor.stop()
    assert set(found) == set(expected)  # none lost
    flagged = [o for o, records in found.items() if records[0]["reference_wait_expired"]]
    assert len(flagged) == ORDERS
    assert all(found[o][0]["features"]["payment_status"] == "MISSING" for o in flagged)
    corrected = assert_never_silently_wrong(found, expected)
    changed = sum(found[o][0]["features"] != expected[o] for o in expected)
    assert corrected == changed > 0
    assert {last(r)["revision_reason"] for r in found.values() if last(r)["revision"] > 1} \
        <= {f"late_reference:{s}" for s in ("inventory", "payments", "zip_codes",
                                            "inventory,payments", "inventory,zip_codes",
                                            "payments,zip_codes", "inventory,payments,zip_codes")}


def test_a_worker_killed_mid_stream_restores_and_stays_exact(
        settings: Settings, live_data: Path, model_dir: Path, expected: dict) -> None:
    settings = settings.replace(reference_max_wait_ms=60_000)
    supervisor = start(settings, model_dir, workers=2)
    try:
        since = int(time.time() * 1000)
        feeding = threading.Thread(target=replay, args=(settings, live_data),
                                   kwargs={"rate": 40_000, "progress": False})
        feeding.start()
        time.sleep(1.5)
        os.kill(supervisor.pids()[0], signal.SIGKILL)  # the supervisor restarts it
        feeding.join(120)
        found = predictions(settings, set(expected), since)
    finally:
        supervisor.stop()
    assert supervisor.restarts >= 1
    assert_never_silently_wrong(found, expected)
    for records in found.values():  # duplicates of a revision, if any, say the same
        by_revision: dict[int, list] = {}
        for r in records:
            by_revision.setdefault(r["revision"], []).append(
                {k: v for k, v in r.items() if k != "scored_at_ms"})
        assert all(c == same[0] for same in by_revision.values() for c in same)


def test_a_bad_reference_record_is_dead_lettered_and_moves_nothing(
        settings: Settings, live_data: Path, model_dir: Path) -> None:
    codec = Codec("inventory")
    producer = make_producer(settings.connection)
    producer.produce(settings.topics.topic_of("inventory"), key=b"S", value=b"not avro")
    producer.produce(settings.topics.topic_of("inventory"), key=b"S", value=codec.encode(
        {"sku_code": "", "timestamp_ms": 1_767_607_200_000, "inventory": 1.0}))
    assert producer.flush(30) == 0
    supervisor = start(settings.replace(reference_max_wait_ms=60_000), model_dir, workers=1)
    try:
        with TopicReader(settings.connection, settings.topics.reference_dlq_topic,
                         None) as reader:
            letters = []
            deadline = time.monotonic() + 60
            while len(letters) < 2 and time.monotonic() < deadline:
                letters += [headers_dict(m.headers()) for m, _ in reader.poll(timeout_s=0.5)]
    finally:
        supervisor.stop()
    assert sorted(h["triage.errors.reason"] for h in letters) == ["missing_field",
                                                                   "unknown_framing"]
    assert {h["__connect.errors.topic"] for h in letters} == {settings.topics.topic_of("inventory")}


def test_payments_from_a_foreign_partitioner_are_counted_and_joined_right(
        settings: Settings, live_data: Path, model_dir: Path, expected: dict) -> None:
    """Payments published by a client left at librdkafka's default partitioner
    (consistent_random, CRC-32): most land on another partition than their order's. The
    workers count and warn about them, and every order still gets its payment."""
    settings = settings.replace(reference_max_wait_ms=60_000)
    supervisor = start(settings, model_dir, workers=2)
    try:
        since = int(time.time() * 1000)
        replay(settings, live_data, streams=["inventory", "zip_codes"], progress=False)
        foreign = make_producer(settings.connection, partitioner="consistent_random")
        codec = Codec("payment")
        frame = pd.read_csv(live_data / "payments.csv", dtype=str, keep_default_na=False)
        times = pd.to_datetime(frame["timestamp"]).dt.as_unit("ms").astype("int64")
        placements = []
        for order_id, at, status in zip(frame["order_id"], times, frame["payment_status"],
                                        strict=True):
            foreign.produce(settings.topics.topic_of("payments"), key=order_id.encode(),
                            value=codec.encode({"order_id": order_id, "timestamp_ms": int(at),
                                                "payment_status": status}),
                            on_delivery=lambda err, msg: placements.append(
                                (msg.key(), msg.partition())))
        assert foreign.flush(60) == 0
        replay(settings, live_data, streams=["orders"], progress=False)
        found = predictions(settings, set(expected), since)
        counted = [s["reference_misplaced"] for s in supervisor.statuses().values()]
    finally:
        supervisor.stop()
    documented = partitions_for([k for k, _ in placements], settings.topics.orders_partitions)
    misplaced = int(np.count_nonzero(documented != np.array([p for _, p in placements])))
    assert misplaced > len(placements) / 2  # most are elsewhere than murmur2 would put them
    assert counted == [misplaced, misplaced]  # each worker reads, and checks, every partition
    assert_never_silently_wrong(found, expected)
    assert all(r[0]["features"]["payment_status"] == expected[o]["payment_status"]
               for o, r in found.items())


def test_a_reference_topic_created_after_the_workers_started_is_read(
        settings: Settings, live_data: Path, model_dir: Path, expected: dict) -> None:
    """The payments topic does not exist when the worker starts (one
    reference_topic_missing); it is created later, and the worker reads it within
    TRIAGE_METADATA_REFRESH_MS: the orders after it are scored with their payments, unflagged."""
    later = settings.replace(payments_topic=settings.topics.topic_of("payments") + "-later",
                             reference_max_wait_ms=60_000, metadata_refresh_ms=1_000)
    supervisor = start(later, model_dir, workers=1)
    try:
        from confluent_kafka.admin import NewTopic

        admin = make_admin(later.connection)
        for future in admin.create_topics([NewTopic(later.topics.topic_of("payments"),
                                                    later.topics.orders_partitions,
                                                    1)]).values():
            future.result()
        since = int(time.time() * 1000)
        replay(later, live_data, progress=False)
        found = predictions(later, set(expected), since)
    finally:
        supervisor.stop()
    assert_never_silently_wrong(found, expected)
    assert not any(r[0]["reference_wait_expired"] for r in found.values())


def test_realistic_producer_timing_with_two_workers_and_a_restart_is_never_silently_wrong(
        settings: Settings, model_dir: Path) -> None:
    """The property test's timing (bench/timing.py), seeded, on the broker in real time: the
    four streams published with independent delays up to 3 s, a pause and its burst, events
    out of order, producer clocks up to 0.5 s ahead; two workers, one SIGKILLed in the middle
    and restarted. Every order's last revision equals merge_asof over all the events, and no
    first prediction is wrong without a flag or a correction."""
    from triage.bench.timing import ORDERS, Timing, publish, store_history

    topics = {ORDERS: settings.topics.orders_topic,
              **{s: settings.topics.topic_of(s) for s in ("payments", "inventory", "zip_codes")}}
    codecs = {ORDERS: Codec("order"), "payments": Codec("payment"),
              "inventory": Codec("inventory"), "zip_codes": Codec("zip_code")}
    keys = {ORDERS: "order_id", "payments": "order_id", "inventory": "sku_code",
            "zip_codes": "zip_code"}
    supervisor = start(settings.replace(reference_max_wait_ms=10_000), model_dir, workers=2)
    rng = np.random.default_rng(2026)
    begin = int(time.time() * 1000) + 1_000
    events = publish(rng, store_history(rng, 250, start_ms=begin, max_gap_ms=80),
                     Timing(max_delay_ms=3_000, pauses=1, pause_ms=3_000, skew_ms=500))
    expected = merge_asof_features(events)
    producer = make_producer(settings.connection, **{"linger.ms": 0})
    try:
        since = int(time.time() * 1000)
        killed = False
        for event in events:
            wait = (event.published_ms - time.time() * 1000) / 1000
            if wait > 0:
                time.sleep(wait)  # the scenario: each record published at its own time
            if not killed and event.time_ms > events[len(events) // 2].time_ms:
                os.kill(supervisor.pids()[0], signal.SIGKILL)  # restarted by the supervisor
                killed = True
            producer.produce(topics[event.stream], key=event.record[keys[event.stream]].encode(),
                             value=codecs[event.stream].encode(event.record))
            producer.poll(0)
        assert producer.flush(30) == 0
        found = predictions(settings, set(expected), since)
    finally:
        supervisor.stop()
    assert supervisor.restarts >= 1
    assert_never_silently_wrong(found, expected)
