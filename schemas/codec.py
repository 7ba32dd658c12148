"""Avro codec for the service's records.

Two framings, one decoder:

* **Single-object encoding** (the Avro specification's): ``C3 01``, the 8-byte little-endian
  CRC-64-AVRO fingerprint of the schema's parsing canonical form, then the Avro binary body.
  The default: it needs no registry and still names its schema.
* **Confluent Schema Registry framing**: ``00``, a 4-byte big-endian schema id, then the body.
  Written when a registry URL is set, through confluent-kafka's Avro serializers.

:meth:`Codec.decode` looks at the first byte and accepts either, so producers and consumers can
move between the two without a stop.

Logical types. A producer may declare a contract's field with a standard Avro logical type:
``timestamp_ms`` as ``{"type": "long", "logicalType": "timestamp-millis"}``, ``order_id`` as a
``uuid`` string, an amount as a ``decimal``. Registry-framed records carry their writer's
schema (by id): they are decoded with fastavro against that schema and the contract adapted to
it once per schema id (:mod:`schemas.logical`), and the values come back in the contract's
types and units (epoch milliseconds, float, int, str). A logical type the contract's field
cannot take (``time-millis`` into a timestamp) makes that schema id a ``registry_error``.
Single-object records name their schema by the fingerprint of its parsing canonical form, which
has no ``logicalType``: a writer's logical types are invisible there and the raw values are
read, which is right for ``timestamp-millis`` (and a ``uuid`` string) but **not** for
``timestamp-micros``: on the wire it is indistinguishable from millis and reads as milliseconds
a thousand times too large (an order's is then rejected by validation as a future timestamp).
Writers must use millis, or registry framing, which carries the schema.

Generated codecs. For the contracts in :data:`COMPILED_CONTRACTS` (those whose equality with
fastavro tests/unit/test_compiled_codec.py proves), an encoder and a decoder are generated from
the ``.avsc`` once per process (:mod:`schemas.compiled`): no walk over the schema per record.
The encoder serves single-object encoding (a registry's serializer does its own); a record it
is not sure of (a numpy scalar, a missing field with a default, a value fastavro would coerce or
refuse) is written by fastavro as before. The decoder serves single-object records written with
the contract's own schema (its fingerprint); records of an earlier writer schema and
registry-framed ones go through fastavro and its schema resolution as before. Both give
fastavro's bytes and values, and bad bodies fail with the same reasons.
"""

from __future__ import annotations

import functools
import io
import json
from importlib import resources
from typing import Any

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint, to_parsing_canonical_form

from triage.bus.errors import BadRecord, InfrastructureError
from triage.bus.settings import ConnectionSettings
from triage.schemas.compiled import (
    CompiledCodec,
    Layout,
    Unsupported,
    column_rows,
    compile_columns,
    compile_schema,
    layout_of,
)
from triage.schemas.logical import Convert, UnconvertibleValue, adapt

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
REGISTRY_MAGIC = 0
_SINGLE_OBJECT_HEADER = len(SINGLE_OBJECT_MAGIC) + 8
_REGISTRY_HEADER = 5


class RegistryUnavailable(InfrastructureError):
    """The Schema Registry could not be reached, or refused for a reason of its own (a 5xx, a
    timeout, an authentication failure): not the record's fault, so nothing is dead-lettered.
    The worker stops without committing; the supervisor restarts it with backoff, and the
    batch is read again once the registry answers."""


class DecodeError(BadRecord):
    """A record's bytes are not a valid record of the expected schema.

    ``reason`` is a short machine-readable code (``tombstone``, ``unknown_framing``,
    ``unknown_schema``, ``invalid_avro``, ``trailing_bytes``, ``no_registry``,
    ``registry_error``); ``message`` says what exactly was wrong.
    """


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema ``schemas/<name>.avsc``, e.g. ``order``; ``history/prediction.1``
    for an earlier version of a contract."""
    text = resources.files("triage.schemas").joinpath(f"{name}.avsc").read_text()
    schema = fastavro.parse_schema(json.loads(text))
    if not isinstance(schema, dict):
        raise TypeError(f"{name}.avsc is not a record schema")
    return schema


@functools.cache
def earlier_versions(name: str) -> tuple[dict[str, Any], ...]:
    """Earlier versions of contract ``name`` (``schemas/history/<name>.<n>.avsc``): records
    written with them still decode, resolved to the current version (schema evolution: fields
    added since have defaults)."""
    history = resources.files("triage.schemas").joinpath("history")
    found = sorted(entry.name for entry in history.iterdir()
                   if entry.name.startswith(f"{name}.") and entry.name.endswith(".avsc"))
    return tuple(load_schema(f"history/{file.removesuffix('.avsc')}") for file in found)


# The contracts served by generated codecs: each one's encoder and decoder are proven equal to
# fastavro's by tests/unit/test_compiled_codec.py. A contract added to schemas/ takes them only
# once it is added here and there.
COMPILED_CONTRACTS = frozenset({"order", "prediction", "drift_sample", "drift_report",
                                "model_state", "inventory", "payment", "zip_code",
                                "windowed_features"})


@functools.cache
def compiled_codec(name: str) -> CompiledCodec | None:
    """The generated codec of contract ``name``, once per process; None for a contract not in
    :data:`COMPILED_CONTRACTS` or one whose schema the generator does not take (fastavro then
    does all)."""
    if name not in COMPILED_CONTRACTS:
        return None
    try:
        return compile_schema(load_schema(name))
    except Unsupported:
        return None


@functools.cache
def columns_encoder(name: str, layout: Layout) -> Any:
    """The generated columns encoder of contract ``name`` for ``layout``
    (schemas/compiled.py: ``encode_columns(columns, n, header)``), once per process and
    layout; None where the contract has no generated codec or the layout does not fit it."""
    if compiled_codec(name) is None:
        return None
    try:
        return compile_columns(load_schema(name), layout)[0]
    except Unsupported:
        return None


def schema_fingerprint(schema: dict[str, Any]) -> bytes:
    """CRC-64-AVRO of the parsing canonical form, little-endian, as single-object encoding uses."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


def registry_config(connection: ConnectionSettings) -> dict[str, str]:
    """The Schema Registry client's configuration beyond its URL: credentials and TLS files."""
    conf = {"basic.auth.user.info": connection.schema_registry_basic_auth,
            "ssl.ca.location": connection.schema_registry_ssl_ca_location,
            "ssl.certificate.location": connection.schema_registry_ssl_certificate_location,
            "ssl.key.location": connection.schema_registry_ssl_key_location,
            "ssl.key.password": connection.schema_registry_ssl_key_password}
    return {key: value for key, value in conf.items() if value}


@functools.cache
def _registry_client(url: str, conf: tuple[tuple[str, str], ...] = ()) -> Any:
    # One client per URL and configuration per process: it caches schema ids, which is what
    # keeps decoding cheap.
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient.new_client({"url": url, **dict(conf)})  # "mock://": in memory


def codec_for(connection: ConnectionSettings, schema_name: str, topic: str) -> Codec:
    """The codec for one of the service's topics, framed as the settings say."""
    return Codec(schema_name, topic=topic, registry_url=connection.schema_registry_url,
                 registry_conf=registry_config(connection))


class Codec:
    """Encode and decode records of one schema, for one topic."""

    def __init__(self, schema_name: str, *, topic: str = "", registry_url: str = "",
                 registry_conf: dict[str, str] | None = None) -> None:
        self.schema_name = schema_name
        self.schema = load_schema(schema_name)
        self.topic = topic
        self.registry_url = registry_url
        self._header = SINGLE_OBJECT_MAGIC + schema_fingerprint(self.schema)
        # Writer schemas this decoder knows by fingerprint: this version of the contract and
        # the earlier ones, which fastavro resolves to this one.
        self._writers = {schema_fingerprint(old): old for old in earlier_versions(schema_name)}
        self._writers[self._header[2:]] = self.schema
        self._serializer = self._registry = None
        compiled = compiled_codec(schema_name)
        # The generated encoder writes single-object records only (a registry's serializer
        # frames and registers); the generated decoder reads the contract's own writer schema.
        self._encode_body = compiled.encode if compiled and not registry_url else None
        self._decode_body = compiled.decode if compiled else None
        # Registry schema id -> how to read it: see _registry_reader.
        self._registry_readers: dict[int, tuple[Any, Any, Convert | None]] = {}
        if registry_url:
            from confluent_kafka.schema_registry.avro import AvroSerializer

            conf = tuple(sorted((registry_conf or {}).items()))
            self._registry = _registry_client(registry_url, conf)
            self._serializer = AvroSerializer(self._registry,
                                              to_parsing_canonical_form(self.schema))

    def encode(self, record: dict[str, Any]) -> bytes:
        if self._serializer is not None:
            from confluent_kafka.serialization import MessageField, SerializationContext

            try:
                data: bytes = self._serializer(
                    record, SerializationContext(self.topic, MessageField.VALUE))
                return data
            except Exception as exc:
                if _registry_in_trouble(exc):
                    raise RegistryUnavailable(
                        f"Schema Registry {self.registry_url}: could not register or look up "
                        f"the {self.schema_name} schema: {type(exc).__name__}: {exc}") from exc
                raise
        if self._encode_body is not None:
            try:
                return self._header + self._encode_body(record)
            except Exception:  # not sure of fastavro's bytes: fastavro writes it
                pass
        out = io.BytesIO()
        out.write(self._header)
        fastavro.schemaless_writer(out, self.schema, record)
        return out.getvalue()

    def encode_columns(self, columns: dict[str, Any], n: int) -> list[bytes]:
        """``n`` records given as columns (schemas/compiled.py: field name -> a list of ``n``
        values, a Constant, a MapMatrix, or a record field's own columns), encoded: the same
        bytes as :meth:`encode` of each record :func:`~triage.schemas.compiled.column_rows`
        builds from them. The generated columns encoder writes them where it can; else the
        records are built and encoded one by one. Raises what :meth:`encode` raises."""
        if self._encode_body is not None:
            encoder = columns_encoder(self.schema_name, layout_of(columns))
            if encoder is not None:
                try:
                    out: list[bytes] = encoder(columns, n, self._header)
                    return out
                except Exception:  # not sure of fastavro's bytes: record by record
                    pass
        return [self.encode(record) for record in column_rows(columns, n)]

    def decode(self, data: bytes | None) -> dict[str, Any]:
        """The record in ``data``, in either framing, in the contract's types and units
        (timestamps in UTC epoch milliseconds, whatever logical type the writer declared).

        Raises :class:`DecodeError` with a reason, or :class:`RegistryUnavailable`."""
        if data is None:
            raise DecodeError("tombstone", "null value (tombstone)")
        if (self._decode_body is not None and data.__class__ is bytes
                and data.startswith(self._header)):
            # The common case first: a record of this contract's own schema, read by the
            # generated decoder with _read's outcomes.
            try:
                record, end = self._decode_body(data, _SINGLE_OBJECT_HEADER)
            except Exception as exc:  # IndexError, struct.error, UnicodeDecodeError, ...
                raise DecodeError("invalid_avro",
                                  f"invalid Avro body: {type(exc).__name__}: {exc}") from None
            if end != len(data):
                raise DecodeError("trailing_bytes",
                                  f"{len(data) - end} bytes left over after the record")
            return record
        if data[:2] == SINGLE_OBJECT_MAGIC:
            return self._decode_single_object(data)
        if data[:1] == b"\x00" and len(data) >= 5:
            return self._decode_registry_framed(data)
        raise DecodeError("unknown_framing",
                          f"unknown framing: first bytes {data[:2].hex() or 'empty'} are "
                          "neither Avro single-object (c301) nor Schema Registry (00) framing")

    def _decode_single_object(self, data: bytes) -> dict[str, Any]:
        writer = self._writers.get(data[2:_SINGLE_OBJECT_HEADER])
        if writer is None:
            raise DecodeError("unknown_schema", f"unknown schema fingerprint "
                              f"{data[2:10].hex()} for {self.schema_name}")
        # This version of the contract needs no schema resolution (as bytes, decode has read it
        # with the generated decoder); an earlier one does.
        return _read(data, _SINGLE_OBJECT_HEADER, writer,
                     None if writer is self.schema else self.schema)

    def _decode_registry_framed(self, data: bytes) -> dict[str, Any]:
        schema_id = int.from_bytes(data[1:5], "big")
        how = self._registry_readers.get(schema_id)
        if how is None:
            how = self._registry_readers[schema_id] = self._registry_reader(schema_id)
        writer, reader, normalise = how
        try:
            record = _read(data, _REGISTRY_HEADER, writer, reader)
            return record if normalise is None else normalise(record)
        except SchemaResolutionError as exc:
            raise DecodeError("registry_error", f"registry-framed record (schema id "
                              f"{schema_id}): the writer's schema does not resolve to "
                              f"{self.schema_name}: {exc}") from None
        except UnconvertibleValue as exc:
            raise DecodeError("invalid_avro", str(exc)) from None

    def _registry_reader(self, schema_id: int) -> tuple[Any, Any, Convert | None]:
        """How to read records framed with ``schema_id``: the writer schema from the registry
        (with the subjects it references), the reader schema (the contract adapted to the
        writer's logical types; None when the writer has the contract's shape) and the
        normalisation of what fastavro decodes into the contract's units (None: nothing to do)."""
        if self._registry is None:
            raise DecodeError("no_registry", f"Schema Registry framed record (schema id "
                              f"{schema_id}) but no registry is configured "
                              "(TRIAGE_SCHEMA_REGISTRY_URL)")
        from confluent_kafka.schema_registry.avro import parse_schema_with_repo

        try:
            registered = self._registry.get_schema(schema_id)
            writer = parse_schema_with_repo(registered.schema_str,
                                            _referenced(self._registry, registered))
            names: dict[str, Any] = {}
            fastavro.parse_schema(writer, named_schemas=names)
            reader, normalise = adapt(self.schema, writer, names)
            # The contract's own shape, its logical types aside: no schema resolution needed.
            same_shape = (not registered.references and isinstance(writer, dict)
                          and schema_fingerprint(writer) == self._header[2:])
        except Exception as exc:
            if _registry_in_trouble(exc):
                raise RegistryUnavailable(
                    f"Schema Registry {self.registry_url}: looking up schema id {schema_id}: "
                    f"{type(exc).__name__}: {exc}") from exc
            raise DecodeError("registry_error", f"registry-framed record (schema id "
                              f"{schema_id}) could not be decoded: "
                              f"{type(exc).__name__}: {exc}") from None
        return writer, (None if same_shape else reader), normalise


def _read(data: bytes, start: int, writer: Any, reader: Any) -> dict[str, Any]:
    """The record whose Avro body starts at ``start``; the body must end with ``data``."""
    body = io.BytesIO(data)
    body.seek(start)
    try:
        record = fastavro.schemaless_reader(body, writer, reader)
    except SchemaResolutionError:
        raise
    except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeDecodeError, ...
        raise DecodeError("invalid_avro",
                          f"invalid Avro body: {type(exc).__name__}: {exc}") from None
    if body.tell() != len(data):
        raise DecodeError("trailing_bytes",
                          f"{len(data) - body.tell()} bytes left over after the record")
    if not isinstance(record, dict):
        raise DecodeError("invalid_avro", f"not a record: {type(record).__name__}")
    return record


def _referenced(client: Any, schema: Any, found: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """The named types ``schema`` references (other registry subjects, and theirs), by name, as
    JSON."""
    found = {} if found is None else found
    for reference in schema.references or ():
        if reference.name not in found:
            referenced = client.get_version(reference.subject, reference.version, True).schema
            found[reference.name] = json.loads(referenced.schema_str)
            _referenced(client, referenced, found)
    return found


# What a Schema Registry answers for a schema id it does not have (the mock client: 40400).
_SCHEMA_NOT_FOUND = (40403, 40400)


def _registry_in_trouble(exc: Exception) -> bool:
    """True when the registry, not the record, failed: it did not answer (connection, TLS,
    timeout: the HTTP client's transport errors), or answered with anything but "schema not
    found" (a 5xx, a refused credential, a proxy's 404 page). Anything else, a body that does
    not decode included, is the record's fault: dead-lettering it is safe, while stopping on a
    poison record would stop its partition for good."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    if isinstance(exc, SchemaRegistryError):
        return exc.error_code not in _SCHEMA_NOT_FOUND
    # httpx (which confluent-kafka's registry client uses, under a package name that varies
    # with its version) raises TransportError subclasses, not OSError.
    return isinstance(exc, OSError) or any(
        cls.__name__ == "TransportError" and cls.__module__.startswith("httpx")
        for cls in type(exc).__mro__)
