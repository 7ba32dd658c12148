"""The Avro codec: both framings round-trip, the decoder reads both, and bad bytes say why."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fastavro
import pytest

from schemas.codec import Codec, DecodeError, RegistryUnavailable

ORDER = {"order_id": "O-1", "customer_id": "C-9", "timestamp_ms": 1_767_225_600_000,
         "sku_code": "SKU-00042", "zip_code": "01234"}
PREDICTION = {
    "order_id": "O-1", "customer_id": "C-9", "recommendation": "HoldCheckPayment",
    "probabilities": {"Deliver": 0.25, "HoldCheckPayment": 0.75},
    "model_version": "xgb-0123456789ab",
    "features": {"order_hour_of_day": 13, "inventory": None, "payment_status": "MISSING",
                 "zip_code_available": True},
    "order_timestamp_ms": 1, "scored_at_ms": 2, "order_published_at_ms": 3,
    "order_partition": 4, "order_offset": 5,
}


def crc64_avro(data: bytes) -> int:
    """The Avro specification's Rabin fingerprint, written out from the spec."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def test_single_object_encoding_follows_the_avro_spec() -> None:
    codec = Codec("order")
    data = codec.encode(ORDER)
    assert data[:2] == b"\xc3\x01"
    canonical = fastavro.schema.to_parsing_canonical_form(codec.schema).encode()
    assert int.from_bytes(data[2:10], "little") == crc64_avro(canonical)
    body = fastavro.schemaless_reader(io.BytesIO(data[10:]), codec.schema, None)
    assert body == ORDER


@pytest.mark.parametrize(("schema", "record"), [("order", ORDER), ("prediction", PREDICTION)])
def test_single_object_round_trip(schema: str, record: dict) -> None:
    codec = Codec(schema)
    assert codec.decode(codec.encode(record)) == record


def test_registry_framing_round_trip_and_the_decoder_reads_both() -> None:
    registry = Codec("order", topic="orders", registry_url="mock://codec-test")
    framed = registry.encode(ORDER)
    assert framed[0] == 0 and int.from_bytes(framed[1:5], "big") >= 1
    assert registry.decode(framed) == ORDER
    assert registry.decode(Codec("order").encode(ORDER)) == ORDER


def test_registry_framing_without_a_registry_is_a_clear_decode_error() -> None:
    framed = Codec("order", topic="orders", registry_url="mock://codec-test-2").encode(ORDER)
    with pytest.raises(DecodeError, match="no registry is configured"):
        Codec("order").decode(framed)


def test_a_schema_id_the_registry_does_not_have_is_the_record_s_fault() -> None:
    framed = Codec("order", topic="orders", registry_url="mock://codec-test-3").encode(ORDER)
    unknown = framed[:1] + (999_999).to_bytes(4, "big") + framed[5:]
    with pytest.raises(DecodeError, match="schema id 999999 is not in the registry") as caught:
        Codec("order", topic="orders", registry_url="mock://codec-test-3").decode(unknown)
    assert caught.value.kind == "registry_error"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def registry_answering(status: int) -> Iterator[str]:
    """A real HTTP server on loopback that answers every request with ``status``."""

    class Handler(BaseHTTPRequestHandler):

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def _answer(self) -> None:
            body = json.dumps({"error_code": status * 100,
                               "message": "registry in trouble"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_registry_that_does_not_answer_is_not_the_record_s_fault() -> None:
    """Nothing listens: decoding and encoding stop with RegistryUnavailable, not a DecodeError
    that would dead-letter a good record."""
    framed = Codec("order", topic="orders", registry_url="mock://codec-test-4").encode(ORDER)
    down = Codec("order", topic="orders", registry_url=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(RegistryUnavailable, match="looking up schema id"):
        down.decode(framed)
    with pytest.raises(RegistryUnavailable, match="could not register or look up"):
        down.encode(ORDER)
    assert down.decode(Codec("order").encode(ORDER)) == ORDER  # no registry needed for these


@pytest.mark.parametrize("status", [503, 401])
def test_a_registry_that_fails_or_refuses_us_is_not_the_record_s_fault(status: int) -> None:
    """A 5xx, or credentials it does not take: every record would fail alike, so none is
    dead-lettered."""
    framed = Codec("order", topic="orders", registry_url="mock://codec-test-5").encode(ORDER)
    with registry_answering(status) as url, pytest.raises(RegistryUnavailable,
                                                           match=f"HTTP {status}"):
        Codec("order", topic="orders", registry_url=url).decode(framed)


@pytest.mark.parametrize(("data", "reason"), [
    (None, "tombstone"),
    (b"", "unknown framing"),
    (b"\x7fgarbage", "unknown framing"),
    (b"\xc3\x01" + b"\x00" * 8 + b"\x02", "unknown schema fingerprint"),
])
def test_bad_bytes_raise_decode_error_with_a_reason(data: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        Codec("order").decode(data)


def test_truncated_and_padded_records_are_rejected() -> None:
    codec = Codec("order")
    data = codec.encode(ORDER)
    with pytest.raises(DecodeError, match="invalid Avro body"):
        codec.decode(data[:-3])
    with pytest.raises(DecodeError, match="left over"):
        codec.decode(data + b"\x00")


def test_a_record_of_another_schema_is_rejected_by_fingerprint() -> None:
    with pytest.raises(DecodeError, match="fingerprint"):
        Codec("order").decode(Codec("prediction").encode(PREDICTION))


def test_shared_record_types_are_defined_alike_in_every_contract() -> None:
    """drift_sample.avsc repeats Order and Features inline; they must not drift apart."""
    folder = Path(__file__).parent.parent / "schemas"
    order = json.loads((folder / "order.avsc").read_text())
    prediction = json.loads((folder / "prediction.avsc").read_text())
    drift = {f["name"]: f["type"] for f in
             json.loads((folder / "drift_sample.avsc").read_text())["fields"]}
    features = next(f["type"] for f in prediction["fields"] if f["name"] == "features")

    def shape(record: dict) -> list[tuple[str, object]]:
        return [(f["name"], f["type"]) for f in record["fields"]]

    assert shape(drift["order"]) == shape(order)
    assert shape(drift["features"]) == shape(features)
