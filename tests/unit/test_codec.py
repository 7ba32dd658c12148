"""The Avro codec: both framings round-trip, the decoder reads both, and bad bytes say why."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fastavro
import pytest
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from triage.bus.settings import SettingsError
from triage.schemas.codec import (
    Codec,
    DecodeError,
    RegistryUnavailable,
    _registry_client,
    codec_for,
    load_schema,
    schema_fingerprint,
)
from triage.scoring.validation import OrderValidator
from triage.settings import Settings

ORDER = {"order_id": "O-1", "customer_id": "C-9", "timestamp_ms": 1_767_225_600_000,
         "sku_code": "SKU-00042", "zip_code": "01234"}
PREDICTION = {
    "order_id": "O-1", "customer_id": "C-9", "recommendation": "HoldCheckPayment",
    "probabilities": {"Deliver": 0.25, "HoldCheckPayment": 0.75},
    "model_version": "xgb-0123456789ab",
    "features": {"order_hour_of_day": 13, "inventory": None, "payment_status": "MISSING",
                 "zip_code_available": True, "customer_orders_1h": 2.0,
                 "customer_zip_codes_7d": None, "customer_seconds_since_last": 61.5,
                 "sku_orders_10m": None},
    "order_timestamp_ms": 1, "scored_at_ms": 2, "order_published_at_ms": 3,
    "order_partition": 4, "order_offset": 5, "reference_wait_expired": True,
    "revision": 2, "revision_reason": "late_reference:payments", "sku_code": "SKU-1",
    "zip_code": "00501", "windowed_unknown": {"customer_zip_codes_7d": "wait_expired",
                                             "sku_orders_10m": "window_expired"},
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
    with pytest.raises(DecodeError, match=r"schema id 999999\).*Schema Not Found") as caught:
        Codec("order", topic="orders", registry_url="mock://codec-test-3").decode(unknown)
    assert caught.value.reason == "registry_error"


@pytest.fixture(autouse=True)
def registry_retries_without_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry client retries a failed request 3 times, waiting 1 s, 2 s and 4 s between
    (its defaults, which the service keeps): here it makes the same retries without the waits
    (retries.wait.ms 0), which changes no answer and saves about 25 s of sleeping."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    new_client = SchemaRegistryClient.new_client
    monkeypatch.setattr(SchemaRegistryClient, "new_client", staticmethod(
        lambda conf: new_client({**conf, "retries.wait.ms": 0, "retries.max.wait.ms": 0})))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def registry_server(answer: Callable[[str], tuple[int, dict]],
                    tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """A real HTTP(S) server on loopback; ``answer(path)`` gives each request's status and
    JSON body."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def _answer(self) -> None:
            status, payload = answer(self.path)
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    # shutdown() returns once serve_forever() next looks (every 0.5 s by default)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                              daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def registry_answering(status: int) -> contextlib.AbstractContextManager[str]:
    """A registry in trouble: every request answered with ``status``."""
    return registry_server(lambda _path: (status, {"error_code": status * 100,
                                                   "message": "registry in trouble"}))


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
                                                           match=f"HTTP status code {status}"):
        Codec("order", topic="orders", registry_url=url).decode(framed)


def test_a_404_that_is_not_schema_not_found_is_the_registry_s_fault() -> None:
    """A proxy's 404 page (a wrong URL path) would make every record look unknown."""
    framed = Codec("order", topic="orders", registry_url="mock://codec-test-6").encode(ORDER)
    with registry_server(lambda _path: (404, {"message": "no route"})) as url, \
            pytest.raises(RegistryUnavailable, match="HTTP status code 404"):
        Codec("order", topic="orders", registry_url=url).decode(framed)


def _referencing_registry(reference_status: int) -> contextlib.AbstractContextManager[str]:
    """A registry whose schema id 7 is a union of one type, ``triage.v1.Order``, defined by
    another subject (Confluent's way to put several types in one topic); that subject answers
    ``reference_status``, every other request 503."""
    order = json.dumps(load_schema("order"))
    versions = "/subjects/triage.v1.Order/versions/1"

    def answer(path: str) -> tuple[int, dict]:
        if path.split("?")[0] == "/schemas/ids/7":
            return 200, {"schema": '["triage.v1.Order"]', "references": [
                {"name": "triage.v1.Order", "subject": "triage.v1.Order", "version": 1}]}
        if path.split("?")[0] == versions and reference_status == 200:
            return 200, {"subject": "triage.v1.Order", "version": 1, "id": 6, "schema": order}
        return 503, {"error_code": 50300, "message": "registry in trouble"}

    return registry_server(answer)


def _order_in_a_union_with_id(schema_id: int) -> bytes:
    """ORDER, written as branch 0 of a union, in registry framing with ``schema_id``."""
    framed = _framed_with_id(schema_id)
    return framed[:5] + b"\x00" + framed[5:]


def test_a_schema_that_references_another_subject_is_read() -> None:
    with _referencing_registry(200) as url:
        codec = Codec("order", topic="orders", registry_url=url)
        assert codec.decode(_order_in_a_union_with_id(7)) == ORDER


def test_a_registry_that_fails_after_the_schema_lookup_is_not_the_record_s_fault() -> None:
    """The schema itself is served; the subject it references, looked up next, answers 503."""
    with _referencing_registry(503) as url, pytest.raises(RegistryUnavailable, match="503"):
        Codec("order", topic="orders", registry_url=url).decode(_order_in_a_union_with_id(7))


def _framed_with_id(schema_id: int) -> bytes:
    """ORDER in registry framing with ``schema_id``, written without a registry."""
    body = io.BytesIO()
    fastavro.schemaless_writer(body, load_schema("order"), ORDER)
    return b"\x00" + schema_id.to_bytes(4, "big") + body.getvalue()


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


SCHEMAS = Path(__file__).parents[2] / "schemas"
AT = datetime(2026, 1, 5, 10, 0, 0, 123456, tzinfo=UTC)
AT_MS = 1_767_607_200_123  # AT in UTC epoch milliseconds, floored


def written_as(contract: str, types: dict[str, object]) -> dict:
    """A producer's schema for ``contract``: the contract with the types of the fields at the
    dotted paths replaced (``features.inventory``; through arrays and maps too)."""
    schema = json.loads((SCHEMAS / f"{contract}.avsc").read_text())
    for path, new_type in types.items():
        *parents, leaf = path.split(".")
        node = schema
        for name in parents:
            node = next(f for f in node["fields"] if f["name"] == name)["type"]
            while node["type"] in ("array", "map"):
                node = node["items" if node["type"] == "array" else "values"]
        next(f for f in node["fields"] if f["name"] == leaf)["type"] = new_type
    return schema


def framed_by_producer(url: str, contract: str, types: dict[str, object], record: dict) -> bytes:
    """``record`` as a producer with :func:`written_as` schema publishes it: through
    confluent-kafka's AvroSerializer, registered in the mock registry ``url``."""
    client = _registry_client(url, ())  # the instance Codec(..., registry_url=url) uses
    serializer = AvroSerializer(client, json.dumps(written_as(contract, types)))
    return serializer(record, SerializationContext("orders", MessageField.VALUE))


def decimal(scale: int, precision: int = 18) -> dict:
    return {"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale}


@pytest.mark.parametrize(("declared", "written", "read"), [
    ({"type": "long", "logicalType": "timestamp-millis"}, AT.replace(microsecond=123_000), AT_MS),
    ({"type": "long", "logicalType": "timestamp-micros"}, AT, AT_MS),
    ({"type": "long", "logicalType": "timestamp-micros"},
     datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), -1),
    ({"type": "long", "logicalType": "local-timestamp-millis"},
     AT.replace(microsecond=123_000, tzinfo=None), AT_MS),
    ({"type": "long", "logicalType": "local-timestamp-micros"}, AT.replace(tzinfo=None), AT_MS),
    ({"type": "int", "logicalType": "date"}, date(2026, 1, 5), 1_767_571_200_000),
    (decimal(3), Decimal("1767607200123.000"), AT_MS),
    ({"type": "fixed", "name": "Millis", "size": 8, "logicalType": "decimal", "precision": 18,
      "scale": 0}, Decimal(AT_MS), AT_MS),
], ids=["timestamp-millis", "timestamp-micros", "timestamp-micros-before-1970",
        "local-timestamp-millis", "local-timestamp-micros", "date", "decimal", "fixed-decimal"])
def test_a_producer_s_logical_type_on_the_timestamp_is_read_in_contract_units(
        declared: dict, written: object, read: int, request: pytest.FixtureRequest) -> None:
    url = f"mock://logical-{request.node.callspec.id}"
    data = framed_by_producer(url, "order", {"timestamp_ms": declared},
                              {**ORDER, "timestamp_ms": written})
    decoded = Codec("order", topic="orders", registry_url=url).decode(data)
    assert decoded == {**ORDER, "timestamp_ms": read}
    assert type(decoded["timestamp_ms"]) is int


def test_a_uuid_order_id_is_read_as_its_canonical_string() -> None:
    order_id = uuid.UUID("6f1c2a3e-0b4d-4e5f-8a9b-0c1d2e3f4a5b")
    data = framed_by_producer("mock://logical-uuid", "order",
                              {"order_id": {"type": "string", "logicalType": "uuid"}},
                              {**ORDER, "order_id": order_id})
    decoded = Codec("order", topic="orders", registry_url="mock://logical-uuid").decode(data)
    assert decoded == {**ORDER, "order_id": "6f1c2a3e-0b4d-4e5f-8a9b-0c1d2e3f4a5b"}


@pytest.mark.parametrize(("declared", "written", "read"), [
    (decimal(2), Decimal("12.50"), 12.5),
    (["null", decimal(2)], Decimal("-3.25"), -3.25),
    (["null", decimal(2)], None, None),
], ids=["decimal", "nullable-decimal", "nullable-decimal-null"])
def test_a_decimal_is_read_into_a_nullable_double(declared: object, written: Decimal | None,
                                                  read: float | None,
                                                  request: pytest.FixtureRequest) -> None:
    url = f"mock://logical-{request.node.callspec.id}"
    features = {**PREDICTION["features"], "inventory": written}
    data = framed_by_producer(url, "prediction", {"features.inventory": declared},
                              {**PREDICTION, "features": features})
    decoded = Codec("prediction", topic="predictions", registry_url=url).decode(data)
    assert decoded == {**PREDICTION, "features": {**PREDICTION["features"], "inventory": read}}
    assert type(decoded["features"]["inventory"]) is type(read)


def test_logical_types_in_nested_records_maps_and_arrays() -> None:
    """drift_sample nests Order and Features and has a map; drift_report has arrays of
    records."""
    url = "mock://logical-nested"
    sample = {"order": ORDER, "features": PREDICTION["features"], "recommendation": "Deliver",
              "probabilities": {"Deliver": 0.75}, "model_version": "m", "scored_at_ms": AT_MS,
              "sample_rate": 0.2}
    money = {"type": "fixed", "name": "Money", "size": 8, "logicalType": "decimal",
             "precision": 18, "scale": 2}
    data = framed_by_producer(
        url, "drift_sample",
        {"order.timestamp_ms": {"type": "long", "logicalType": "timestamp-micros"},
         "features.inventory": ["null", money], "probabilities": {"type": "map",
                                                                  "values": decimal(2)}},
        {**sample, "order": {**ORDER, "timestamp_ms": AT},
         "features": {**sample["features"], "inventory": Decimal("7.00")},
         "probabilities": {"Deliver": Decimal("0.75")}})
    decoded = Codec("drift_sample", topic="drift", registry_url=url).decode(data)
    assert decoded == {**sample, "order": {**ORDER, "timestamp_ms": AT_MS},
                       "features": {**sample["features"], "inventory": 7.0}}

    report = {"window_id": "w", "model_version": "m", "status": "ok", "samples": 1,
              "min_samples": 1, "alpha": 0.01, "correction": "holm", "opened_at_ms": AT_MS,
              "closed_at_ms": AT_MS, "first_scored_at_ms": None, "last_scored_at_ms": AT_MS,
              "other_model_samples": 0, "skipped": 0, "first_order_at_ms": AT_MS,
              "last_order_at_ms": AT_MS, "sample_rates": [{"rate": 0.2, "samples": 1}],
              "window_samples": 1000, "window_minutes": None, "checks": [{
                  "name": "payment_status", "feature": "payment_status", "test": "chi2",
                  "verdict": "ok", "samples": 1, "statistic": 0.5, "threshold": None,
                  "p_value": 0.5, "adjusted_p_value": 0.5, "psi": 0.0, "reason": "",
                  "bins": [{"label": "OK", "baseline": 0.25, "current": 0.5}],
                  "unseen": {}}]}
    written = {**report, "last_scored_at_ms": AT, "checks": [{
        **report["checks"][0], "bins": [{"label": "OK", "baseline": Decimal("0.25"),
                                         "current": 0.5}]}]}
    data = framed_by_producer(
        url, "drift_report",
        {"last_scored_at_ms": ["null", {"type": "long", "logicalType": "timestamp-micros"}],
         "checks.bins.baseline": decimal(2)}, written)
    assert Codec("drift_report", topic="drift.reports", registry_url=url).decode(data) == report


def test_a_decimal_with_a_fraction_into_a_long_is_a_bad_record() -> None:
    url = "mock://logical-fraction"
    data = framed_by_producer(url, "order", {"timestamp_ms": decimal(1)},
                              {**ORDER, "timestamp_ms": Decimal("1767607200123.5")})
    with pytest.raises(DecodeError, match=r"timestamp_ms: decimal 1767607200123\.5 is not a "
                                          "whole number") as caught:
        Codec("order", topic="orders", registry_url=url).decode(data)
    assert caught.value.reason == "invalid_avro"


@pytest.mark.parametrize(("contract", "field", "declared", "record", "value"), [
    ("order", "timestamp_ms", {"type": "int", "logicalType": "time-millis"}, ORDER, time(10)),
    ("prediction", "order_partition", {"type": "int", "logicalType": "date"}, PREDICTION,
     date(2026, 1, 5)),
], ids=["time-millis-into-long", "date-into-int"])
def test_a_logical_type_the_contract_cannot_take_is_a_registry_error(
        contract: str, field: str, declared: dict, record: dict, value: object,
        request: pytest.FixtureRequest) -> None:
    url = f"mock://logical-{request.node.callspec.id}"
    data = framed_by_producer(url, contract, {field: declared}, {**record, field: value})
    with pytest.raises(DecodeError, match=f"field {field}: the writer's logical type "
                                          f"{declared['logicalType']}") as caught:
        Codec(contract, topic="orders", registry_url=url).decode(data)
    assert caught.value.reason == "registry_error"


def test_registry_framed_bodies_are_checked_like_single_object_ones() -> None:
    """A writer schema that does not resolve to the contract is the registry's entry's
    fault; a cut or padded body is the record's."""
    url = "mock://logical-checks"
    codec = Codec("order", topic="orders", registry_url=url)
    data = codec.encode(ORDER)
    with pytest.raises(DecodeError, match="invalid Avro body") as caught:
        codec.decode(data[:-3])
    assert caught.value.reason == "invalid_avro"
    with pytest.raises(DecodeError, match="left over") as caught:
        codec.decode(data + b"\x00")
    assert caught.value.reason == "trailing_bytes"
    other = framed_by_producer(url, "order", {"timestamp_ms": "string"},
                               {**ORDER, "timestamp_ms": "yesterday"})
    with pytest.raises(DecodeError, match="does not resolve to order") as caught:
        codec.decode(other)
    assert caught.value.reason == "registry_error"


def test_single_object_encoding_ignores_a_writer_s_timestamp_millis() -> None:
    """Parsing canonical form drops logicalType: a writer that declares timestamp-millis has the
    contract's fingerprint, and its records decode to the raw long, as before."""
    writer = fastavro.parse_schema(
        written_as("order", {"timestamp_ms": {"type": "long", "logicalType": "timestamp-millis"}}))
    assert schema_fingerprint(writer) == schema_fingerprint(load_schema("order"))
    body = io.BytesIO()
    fastavro.schemaless_writer(body, writer, {**ORDER, "timestamp_ms": AT.replace(microsecond=0)})
    data = b"\xc3\x01" + schema_fingerprint(writer) + body.getvalue()
    assert Codec("order").decode(data) == {**ORDER, "timestamp_ms": AT_MS - 123}


def test_an_order_with_logical_types_passes_validation() -> None:
    """What used to dead-letter every such order as hook_failed."""
    now = datetime.now(UTC).replace(microsecond=0)
    order_id = uuid.uuid4()
    data = framed_by_producer(
        "mock://logical-validation", "order",
        {"order_id": {"type": "string", "logicalType": "uuid"},
         "timestamp_ms": {"type": "long", "logicalType": "timestamp-millis"}},
        {**ORDER, "order_id": order_id, "timestamp_ms": now})
    order = Codec("order", topic="orders", registry_url="mock://logical-validation").decode(data)
    assert order == {**ORDER, "order_id": str(order_id),
                     "timestamp_ms": int(now.timestamp()) * 1000}
    assert list(OrderValidator(Settings().validation).check([order])) == []


def test_shared_record_types_are_defined_alike_in_every_contract() -> None:
    """drift_sample.avsc repeats Order and Features inline; they must not drift apart."""
    order = json.loads((SCHEMAS / "order.avsc").read_text())
    prediction = json.loads((SCHEMAS / "prediction.avsc").read_text())
    drift = {f["name"]: f["type"] for f in
             json.loads((SCHEMAS / "drift_sample.avsc").read_text())["fields"]}
    features = next(f["type"] for f in prediction["fields"] if f["name"] == "features")

    def shape(record: dict) -> list[tuple[str, object]]:
        return [(f["name"], f["type"]) for f in record["fields"]]

    assert shape(drift["order"]) == shape(order)
    assert shape(drift["features"]) == shape(features)


def _self_signed_certificate(folder: Path, password: bytes) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key encrypted with ``password``
    (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "triage test registry")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "registry.pem", folder / "registry.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(password)))
    return cert_path, key_path


def test_an_https_registry_is_reached_with_the_configured_ca_and_client_certificate(
        tmp_path: Path) -> None:
    """The registry TLS settings reach the client: a server that requires a client certificate
    answers with all four set (the key is encrypted); without the CA, or without the client
    certificate, the handshake fails, which is the registry's problem, not the record's."""
    cert_path, key_path = _self_signed_certificate(tmp_path, b"key password")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_path, key_path, password=b"key password")
    tls.verify_mode = ssl.CERT_REQUIRED
    tls.load_verify_locations(cert_path)  # the same self-signed certificate signs the client's
    schema = json.dumps(load_schema("order"))

    def answer(path: str) -> tuple[int, dict]:
        if path.startswith("/schemas/ids/7"):
            return 200, {"schema": schema}
        return 404, {"error_code": 40403, "message": "Schema not found"}

    framed = _framed_with_id(7)
    with registry_server(answer, tls) as url:
        mutual = Settings.of(schema_registry_url=url,
                          schema_registry_ssl_ca_location=str(cert_path),
                          schema_registry_ssl_certificate_location=str(cert_path),
                          schema_registry_ssl_key_location=str(key_path),
                          schema_registry_ssl_key_password="key password")
        assert codec_for(mutual.connection, "order", "orders").decode(framed) == ORDER
        with pytest.raises(RegistryUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            codec_for(Settings.of(schema_registry_url=url).connection, "order",
                      "orders").decode(framed)
        ca_only = Settings.of(schema_registry_url=url,
                           schema_registry_ssl_ca_location=str(cert_path))
        with pytest.raises(RegistryUnavailable):
            codec_for(ca_only.connection, "order", "orders").decode(framed)


def test_registry_tls_files_are_checked_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="TRIAGE_SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION"):
        Settings.of(schema_registry_ssl_key_location="/run/secrets/registry.key")
    with pytest.raises(SettingsError, match="TRIAGE_SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION"):
        Settings.of(schema_registry_ssl_key_password="key password")
    missing = tmp_path / "ca.pem"
    with pytest.raises(SettingsError, match=f"SSL_CA_LOCATION={missing}: no such file"):
        Settings.of(schema_registry_ssl_ca_location=str(missing))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_prediction_written_with_an_earlier_contract_still_decodes(version: int) -> None:
    """Schema evolution: version 2 added reference_wait_expired, version 3 revision,
    revision_reason, sku_code and zip_code, version 4 the windowed features (null) and
    windowed_unknown (empty), each with a default; records written with an earlier version
    (schemas/history/prediction.<n>.avsc) decode with the defaults."""
    added: dict = {"reference_wait_expired": False} if version == 1 else {}
    if version < 3:
        added |= {"revision": 1, "revision_reason": None, "sku_code": "", "zip_code": ""}
    added |= {"windowed_unknown": {}}
    windowed = {"customer_orders_1h", "customer_zip_codes_7d", "customer_seconds_since_last",
                "sku_orders_10m"}
    old = {k: v for k, v in PREDICTION.items() if k not in added}
    old["features"] = {k: v for k, v in old["features"].items() if k not in windowed}
    data = Codec(f"history/prediction.{version}").encode(old)
    assert data[2:10] != Codec("prediction").encode(PREDICTION)[2:10]  # another fingerprint
    assert Codec("prediction").decode(data) == {
        **old, **added, "features": {**old["features"], **dict.fromkeys(windowed)}}
