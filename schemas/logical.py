"""Logical types a writer adds to a contract's fields, read back in the contract's units.

A producer may declare ``timestamp_ms`` as ``{"type": "long", "logicalType": "timestamp-millis"}``
where the contract has a plain ``long``: the same bytes on the wire, but fastavro applies the
writer's logical types and hands back a ``datetime``. :func:`adapt` walks the contract against
such a writer schema (records, arrays, maps and unions, nested) once per schema and returns the
reader schema to decode with and the function that turns the decoded values back into the
contract's types:

* ``timestamp-millis``, ``timestamp-micros``, ``local-timestamp-millis``,
  ``local-timestamp-micros`` (long) into a ``long``: UTC epoch milliseconds (micros floored,
  local timestamps taken as UTC);
* ``date`` (int) into a ``long``: the day's start in UTC epoch milliseconds (days x 86,400,000);
* ``decimal`` (bytes or fixed) into a ``double`` or ``float``: a float; into a ``long`` or
  ``int``: an int, when whole and in range (else :class:`UnconvertibleValue`);
* ``uuid`` (string) into a ``string``: the canonical form.

Any other logical type fastavro converts (``time-millis``, a ``date`` into an ``int``, ...) is
:class:`UnconvertibleType`. Logical types fastavro does not know are ignored, as Avro says.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import fastavro
from fastavro.read import LOGICAL_READERS

from triage.bus.errors import BadRecord

Schema = Any  # a parsed Avro schema node: a type name, a dict, or a list (a union)
Convert = Callable[[Any], Any]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY = date(1970, 1, 1).toordinal()
_MILLISECOND = timedelta(milliseconds=1)
_DAY_MS = 86_400_000
_INTEGER_BITS = {"int": 32, "long": 64}
_TIMESTAMPS = frozenset({"long-timestamp-millis", "long-timestamp-micros",
                         "long-local-timestamp-millis", "long-local-timestamp-micros"})
# What fastavro decodes each logical type to (the key is fastavro's: "<type>-<logicalType>").
_DECODED_AS = {**dict.fromkeys(_TIMESTAMPS, datetime), "int-date": date,
               "bytes-decimal": Decimal, "fixed-decimal": Decimal, "string-uuid": UUID}
_PARSED_MARKS = frozenset({"__fastavro_parsed", "__named_schemas"})


class UnconvertibleType(BadRecord):
    """The writer's schema has a logical type the contract's type at that field cannot hold
    (dead-letter reason ``registry_error``)."""

    def __init__(self, message: str) -> None:
        super().__init__("registry_error", message)


class UnconvertibleValue(BadRecord):
    """A decoded value the contract's type cannot hold: a decimal with a fraction, or out of
    range, where the contract has an integer (dead-letter reason ``invalid_avro``)."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_avro", message)


def adapt(contract: Schema, writer: Schema, writer_names: dict[str, Schema]
          ) -> tuple[Schema, Convert | None]:
    """The reader schema for records written with ``writer``, and the conversion of a decoded
    record into the contract's units (in place), or None when no field needs one.

    ``contract`` and ``writer`` are parsed schemas; ``writer_names`` holds the writer's named
    types by full name (as ``fastavro.parse_schema(..., named_schemas=...)`` fills it). The
    reader is the contract with the writer's type substituted at every field whose writer type
    carries a logical type, so that fastavro's schema resolution accepts, e.g., a bytes decimal
    where the contract has a double. Raises :class:`UnconvertibleType`.
    """
    reader_names: dict[str, Schema] = {}
    fastavro.parse_schema(contract, named_schemas=reader_names)
    reader, convert = _Adapter(reader_names, writer_names).node(contract, writer, "")
    if convert is None:
        return contract, None
    return fastavro.parse_schema(reader), convert


class _Adapter:
    def __init__(self, reader_names: dict[str, Schema], writer_names: dict[str, Schema]) -> None:
        self.reader_names = reader_names
        self.writer_names = writer_names
        self.records: dict[str, Convert | None] = {}  # reader record name -> its conversion
        self.emitted: set[str] = set()  # writer's named types already defined in the reader

    def node(self, reader: Schema, writer: Schema, path: str) -> tuple[Schema, Convert | None]:
        """The reader schema at ``path`` adapted to the writer's, and its values' conversion."""
        if isinstance(reader, list) or isinstance(writer, list):
            return self.union(reader, writer, path)
        r, w = _named(self.reader_names, reader), _named(self.writer_names, writer)
        logical = _logical(w)
        if logical is not None:
            convert = _conversion(logical, _type(r), path)
            if convert is None:
                raise UnconvertibleType(_unconvertible(w, r, path))
            return self.emit(w), convert
        kind = _type(r)
        if kind != _type(w):
            return reader, None  # a promotion or a mismatch: fastavro resolves it, or refuses
        if kind == "record":
            return self.record(reader, r, w, path)
        if kind in ("array", "map"):
            part = "items" if kind == "array" else "values"
            adapted, convert = self.node(r[part], w[part], f"{path}[]" if part == "items"
                                         else f"{path}{{}}")
            if convert is None:
                return reader, None
            each = _each_item if kind == "array" else _each_value
            return {**r, part: adapted}, functools.partial(each, convert)
        return reader, None

    def record(self, reader: Schema, r: dict[str, Any], w: dict[str, Any], path: str
               ) -> tuple[Schema, Convert | None]:
        name = r["name"]
        if isinstance(reader, str):  # a later use of a named record: keep the reference
            if name not in self.records:
                self.record(r, r, w, path)
            return reader, self.records[name]
        fields: list[tuple[str, Convert]] = []
        self.records[name] = functools.partial(_convert_record, fields)  # recursive types
        written = {field["name"]: field["type"] for field in w["fields"]}
        adapted = []
        for field in r["fields"]:
            found = [written[n] for n in (field["name"], *field.get("aliases", ())) if n in written]
            if not found:
                adapted.append(field)  # the reader's default
                continue
            new_type, convert = self.node(field["type"], found[0],
                                          f"{path}.{field['name']}" if path else field["name"])
            adapted.append({**field, "type": new_type})
            if convert is not None:
                fields.append((field["name"], convert))
        if not fields:
            self.records[name] = None
            return reader, None
        copy = {key: value for key, value in r.items() if key not in _PARSED_MARKS}
        return {**copy, "fields": adapted}, self.records[name]

    def union(self, reader: Schema, writer: Schema, path: str) -> tuple[Schema, Convert | None]:
        """Each writer branch is adapted against the reader branch it resolves to; a logical
        type whose Avro type the reader's union lacks (a decimal's bytes beside the contract's
        double) joins the union. A value of a writer's union may come from any branch: its
        conversion is chosen by the value's Python type."""
        readers = reader if isinstance(reader, list) else [reader]
        branches = writer if isinstance(writer, list) else [writer]
        adapted = list(readers)
        by_type: dict[type, Convert] = {}
        for branch in branches:
            index = self.target(readers, branch, path)
            if index is None:
                continue  # fastavro refuses a value of this branch, if one comes
            new_type, convert = self.node(readers[index], branch, path)
            if convert is None:
                continue
            if _logical(_named(self.writer_names, new_type)) is None:
                adapted[index] = new_type  # a record, array or map with conversions inside
            elif _type(new_type) not in map(_type, adapted):
                adapted.append(new_type)
            decoded = _decoded_as(_named(self.writer_names, branch))
            if by_type.setdefault(decoded, convert) is not convert:
                raise UnconvertibleType(f"field {path}: more than one branch of the writer's "
                                        f"union decodes to {decoded.__name__} and needs converting")
        if not by_type:
            return reader, None
        schema = adapted if isinstance(reader, list) or len(adapted) > 1 else adapted[0]
        if len(branches) == 1:
            return schema, by_type.popitem()[1]
        return schema, functools.partial(_convert_by_type, by_type)

    def target(self, readers: list[Schema], branch: Schema, path: str) -> int | None:
        """The index of the reader branch a writer branch resolves to (the first that fits)."""
        w = _named(self.writer_names, branch)
        logical = _logical(w)
        for index, reader in enumerate(readers):
            r = _named(self.reader_names, reader)
            if logical is not None:
                if _conversion(logical, _type(r), path) is not None:
                    return index
            elif _type(r) == _type(w) and (_type(r) != "record" or _short(r) == _short(w)):
                return index
        if logical is not None:
            raise UnconvertibleType(_unconvertible(w, readers, path))
        return None

    def emit(self, w: dict[str, Any]) -> Schema:
        """The writer's type to put in the reader: a named type (a fixed) is defined once."""
        if "name" not in w:
            return w
        if w["name"] in self.emitted:
            return w["name"]
        self.emitted.add(w["name"])
        return w


def _logical(schema: Schema) -> str | None:
    """fastavro's key for the logical type it decodes ``schema`` with, or None."""
    if isinstance(schema, dict) and "logicalType" in schema:
        key = f"{schema['type']}-{schema['logicalType']}"
        if key in LOGICAL_READERS:
            return key
    return None


def _conversion(logical: str, contract: str, path: str) -> Convert | None:
    if logical in _TIMESTAMPS and contract == "long":
        return _epoch_ms
    if logical == "int-date" and contract == "long":
        return _date_ms
    if logical in ("bytes-decimal", "fixed-decimal"):
        if contract in ("double", "float"):
            return float
        if contract in _INTEGER_BITS:
            return functools.partial(_whole_number, path, contract)
    if logical == "string-uuid" and contract == "string":
        return str
    return None


def _unconvertible(w: dict[str, Any], reader: Schema, path: str) -> str:
    contract = reader if isinstance(reader, list) else _type(reader)
    return (f"field {path}: the writer's logical type {w['logicalType']} ({w['type']}) cannot "
            f"be read as the contract's {contract}")


def _named(names: dict[str, Schema], schema: Schema) -> Schema:
    """The definition of a named type used by its name; any other schema as it is."""
    return names.get(schema, schema) if isinstance(schema, str) else schema


def _type(schema: Schema) -> str:
    return str(schema["type"]) if isinstance(schema, dict) else str(schema)


def _short(schema: dict[str, Any]) -> str:
    return str(schema["name"]).rsplit(".", 1)[-1]


def _decoded_as(schema: Schema) -> type:
    logical = _logical(schema)
    if logical is not None:
        return _DECODED_AS[logical]
    return list if _type(schema) == "array" else dict  # a record or a map


def _epoch_ms(value: datetime) -> int:
    """UTC epoch milliseconds, floored; a naive (local) timestamp is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MILLISECOND


def _date_ms(value: date) -> int:
    """UTC epoch milliseconds of the day's start."""
    return (value.toordinal() - _EPOCH_DAY) * _DAY_MS


def _whole_number(path: str, contract: str, value: Decimal) -> int:
    number = int(value)
    if number != value:
        raise UnconvertibleValue(f"field {path}: decimal {value} is not a whole number, and the "
                                 f"contract has {contract}")
    bits = _INTEGER_BITS[contract]
    if not -(1 << (bits - 1)) <= number < 1 << (bits - 1):
        raise UnconvertibleValue(f"field {path}: decimal {value} is out of range of the "
                                 f"contract's {contract}")
    return number


def _convert_record(fields: list[tuple[str, Convert]], record: dict[str, Any]) -> dict[str, Any]:
    for name, convert in fields:
        record[name] = convert(record[name])
    return record


def _each_item(convert: Convert, items: list[Any]) -> list[Any]:
    return [convert(item) for item in items]


def _each_value(convert: Convert, values: dict[str, Any]) -> dict[str, Any]:
    return {key: convert(value) for key, value in values.items()}


def _convert_by_type(by_type: dict[type, Convert], value: Any) -> Any:
    convert = by_type.get(type(value))
    return value if convert is None else convert(value)
