"""Real input and real faults (issue 10): each test is one kind of failure that once broke
triage, reproduced small, on a real broker and with real processes where it involves them.

This half needs no broker and starts no process; tests/integration/test_real_faults.py has the
rest.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import cp1252_copy
from triage.bus.clients import consumer_config, producer_config
from triage.bus.deadletter import (
    MAX_HEADER_VALUE_BYTES,
    RECORD_OVERHEAD_BYTES,
    fit_dead_letter,
    headers_dict,
    record_size,
)
from triage.bus.settings import SettingsError
from triage.model.orders import read_orders_csv
from triage.model.reference import (
    ReferenceDataError,
    ReferenceTables,
    read_csv,
    truncated_zip_match,
    zip_code_warnings,
)
from triage.settings import Settings

# -- 2. a dead letter too large to send -----------------------------------------------------

def test_a_dead_letter_always_fits_whatever_its_parts_weigh() -> None:
    limit = 1_000_000
    sizes = (0, 10, 150_000, 880_000, 999_000, 2_000_000)
    for key_bytes in sizes:
        for value_bytes in sizes:
            for message_bytes in (10, 5_000_000):
                key, value = b"k" * key_bytes or None, b"v" * value_bytes
                headers = [("__connect.errors.exception.message", b"m" * message_bytes),
                           ("triage.errors.reason", b"oversized")]
                k, v, h = fit_dead_letter(key, value, headers, limit)
                assert record_size(k, v, h) <= limit - RECORD_OVERHEAD_BYTES
                notes = headers_dict(h)
                assert (k is None and key is not None) == ("triage.errors.original-key-bytes"
                                                           in notes)
                assert (v is None) == ("triage.errors.original-bytes" in notes)
                if v is not None:
                    assert v == value  # what is kept is kept whole
                if message_bytes > MAX_HEADER_VALUE_BYTES:
                    assert notes["triage.errors.truncated-headers"] == \
                        "__connect.errors.exception.message"
    # 150 kB key + 880 kB value: dropping the key is enough, the value is kept.
    k, v, h = fit_dead_letter(b"k" * 150_000, b"v" * 880_000, [], limit)
    assert k is None and len(v) == 880_000
    assert headers_dict(h)["triage.errors.original-key-bytes"] == "150000"


# -- 4. a CSV that is not UTF-8 ------------------------------------------------------------

def test_a_csv_in_another_encoding_is_refused_naming_file_line_and_byte(
        history: Path, tmp_path: Path) -> None:
    data = cp1252_copy(history, tmp_path / "data")
    with pytest.raises(ReferenceDataError, match=r"inventory.csv is not utf-8 text: line 4, "
                                                 r"column \d+: byte 0xf6"):
        ReferenceTables.load(data)
    assert "SKU-Größe" in ReferenceTables.load(data, encoding="cp1252").keys("inventory")
    assert "C-Müller" in read_orders_csv(data / "orders.csv", encoding="cp1252").customer_id
    bom = tmp_path / "bom.csv"  # UTF-8 as Excel saves it: a byte-order mark first
    bom.write_bytes("\ufeffzip_code,available_from\n00501,2026-01-01 00:00:00\n".encode())
    assert read_csv(bom, ["zip_code"])["zip_code"].tolist() == ["00501"]
    with pytest.raises(SettingsError, match="TRIAGE_CSV_ENCODING"):
        Settings.of(csv_encoding="no-such-encoding")


def test_clients_refresh_metadata_within_the_setting() -> None:
    """librdkafka's default, 5 minutes, would leave a worker with nothing assigned that long
    after a topic is created again, and a partition added to orders unread as long."""
    settings = Settings.of(bootstrap_servers="127.0.0.1:9")
    assert settings.connection.metadata_refresh_ms == 10_000
    for config in (consumer_config(settings.connection, settings.scorer.group_id),
                   producer_config(settings.connection)):
        assert config["topic.metadata.refresh.interval.ms"] == 10_000


def test_a_deadline_not_well_under_max_poll_interval_is_refused() -> None:
    with pytest.raises(SettingsError, match="at most half of TRIAGE_MAX_POLL_INTERVAL_MS"):
        Settings.of(max_poll_interval_ms=60_000, processing_deadline_ms=40_000)
    with pytest.raises(SettingsError, match="at least TRIAGE_SESSION_TIMEOUT_MS"):
        Settings.of(max_poll_interval_ms=5_000, session_timeout_ms=6_000,
                 processing_deadline_ms=1_000)


def test_this_test_run_has_a_state_directory_of_its_own() -> None:
    """The state file that finds `triage broker` is per user by default: no test may see
    one that another run, or a person, left there (tests/conftest.py)."""
    default = Path.home() / ".local" / "state" / "triage"
    assert Path(Settings().connection.state_dir) != default
    assert Path(os.environ["TRIAGE_STATE_DIR"]).name.startswith("triage-test-state-")


# -- also: zips written as numbers; the drift monitor's open window ---------------------------

def test_zip_codes_that_lost_their_leading_zeros_are_reported() -> None:
    truncated = {str(z): 0 for z in range(500, 600)} | {f"{z:05d}": 0 for z in range(10000,
                                                                                       10900)}
    assert "fewer than the usual 5 digits (e.g. 500, 501, 502)" in zip_code_warnings(
        truncated)[0]
    assert "00562 vs 562" in truncated_zip_match(truncated, ["00562", "10001", "99999"])
    assert zip_code_warnings({"00562": 0, "10001": 0}, ["00562", "99999"]) == []
    assert truncated_zip_match({"00562": 0}, ["ABC", "0"]) is None
