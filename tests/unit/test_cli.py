"""The command line as a person uses it: real processes, the real embedded broker.

This half needs no broker and starts no process; tests/integration/test_cli.py has the rest."""

from __future__ import annotations

import pytest

from triage.bus.settings import SettingsError
from triage.settings import Settings


def test_settings_come_from_the_environment_and_flags_override_them() -> None:
    settings = Settings.from_env({"TRIAGE_BATCH_SIZE": "64", "TRIAGE_ORDERS_TOPIC": "o2"})
    assert (settings.scorer.batch_size, settings.topics.orders_topic) == (64, "o2")
    assert settings.replace(batch_size=8, orders_topic=None).scorer.batch_size == 8
    assert settings.replace(orders_topic=None).topics.orders_topic == "o2"
    with pytest.raises(SettingsError, match="no such setting: batchsize"):
        settings.replace(batchsize=8)
    with pytest.raises(SettingsError, match="TRIAGE_BATCH_SIZE='many' is not a valid int"):
        Settings.from_env({"TRIAGE_BATCH_SIZE": "many"})
    with pytest.raises(SettingsError, match="sample_rate"):
        Settings.from_env({"TRIAGE_SAMPLE_RATE": "1.5"})


@pytest.mark.parametrize(("name", "value"), [
    ("TRIAGE_GATEWAY_PORT", "99999"), ("TRIAGE_GATEWAY_PORT", "0"),
    ("TRIAGE_METRICS_PORT", "70000"), ("TRIAGE_DRIFT_METRICS_PORT", "-1")])
def test_a_port_outside_the_tcp_range_is_refused(name: str, value: str) -> None:
    """Not handed to the socket, which would listen on the number modulo 65536."""
    with pytest.raises(SettingsError, match=f"{name} must be a TCP port"):
        Settings.from_env({name: value})
    assert Settings.from_env({name: "8080"})


def test_a_kafka_cluster_id_is_never_read_as_an_option() -> None:
    """`triage broker --kafka` failed once in 64 starts: StorageTool read a cluster id starting
    with '-' as an option ("argument --cluster-id/-t: expected one argument")."""
    import base64

    from triage.bus.apache_kafka import cluster_id

    ids = [cluster_id() for _ in range(10_000)]  # about 156 started with '-'
    assert not [found for found in ids if found.startswith("-")]
    assert all(len(base64.urlsafe_b64decode(found + "==")) == 16 for found in ids)


def test_readers_keep_the_highest_revision_of_each_order_not_the_latest_offset() -> None:
    """What `triage predictions` prints: a correction read before the revision it replaces
    (another partition, a replay) still wins; streaming, each record that raises its order's
    revision comes out as it arrives."""
    from triage.consumer.reader import latest_revisions

    records = [{"order_id": "a", "revision": 2, "n": 1}, {"order_id": "b", "revision": 1, "n": 2},
               {"order_id": "a", "revision": 1, "n": 3}, {"order_id": "b", "revision": 1, "n": 4},
               {"order_id": "a", "revision": 3, "n": 5}]
    assert [r["n"] for r in latest_revisions(records)] == [5, 4]
    assert [r["n"] for r in latest_revisions(records, streaming=True)] == [1, 2, 4, 5]


def test_produce_takes_an_iso_8601_time_as_the_http_api_does() -> None:
    from triage.producer.produce import csv_time

    assert csv_time("2021-07-04T22:31:02.5+02:00") == "2021-07-04 20:31:02"
    assert csv_time("2021-07-04T20:31:02") == csv_time("2021-07-04 20:31:02")
    assert csv_time("soon") == "soon"  # left for the validation to refuse
    assert csv_time("0001-01-01T00:30:00+01:00") == "0001-01-01T00:30:00+01:00"  # no UTC day
    from triage.producer.produce import event_record

    record = event_record("payment", {"order_id": "O", "timestamp": "2021-07-04T20:31:02Z",
                                      "payment_status": "OK"}, "line 1")
    assert record["timestamp_ms"] == 1625430662000  # a JSON line's ISO time too
