"""Avro codecs generated from a contract's schema: no schema walk per record.

:func:`compile_schema` takes a parsed record schema (a ``.avsc`` of this folder, as
:func:`fastavro.parse_schema` returns it), writes the Python source of two functions for it,
once, and compiles them with :func:`compile`:

* ``encode(record) -> bytes``: the Avro binary body (no framing) of a record;
* ``decode(data, start) -> (record, end)``: the record whose body starts at ``data[start]``, and
  where its body ends.

Everything comes from the schema: field order, each field's reader and writer, the encoded
index of every enum symbol and union branch; nothing is written per field by hand, so a contract
that changes is followed when its codec is compiled again (at start).

**fastavro is the reference** (``schemaless_writer`` and ``schemaless_reader`` of fastavro
1.13, whose behaviour this module reproduces, edge cases included):

* ``encode`` returns exactly fastavro's bytes, or raises. It raises (:class:`Fallback` or
  whatever the record's values raise) whenever it is not sure: a value of a type other than the
  plain ones (a numpy scalar, a Mapping that is not a dict, a tuple for an array), a missing
  field (fastavro would write the field's default), a union whose branch fastavro would choose
  by rules not reproduced here (a dict where the union has two records or a map and a record).
  The caller then writes the record with fastavro, which writes it or says what is wrong with
  it: errors and fastavro's coercions (a float into a long, ``"NaN"`` into a double) are
  fastavro's own. Union branches are chosen as fastavro chooses them (the first branch whose
  validation accepts the value; a ``float`` branch gives way to a later ``double``).
* ``decode`` returns what fastavro returns (the writer schema alone, no resolution), and fails
  where fastavro fails, on any bytes: a varint longer than 10 bytes is read as fastavro reads it
  (bits shifted past 64 wrap modulo 64, as the C shift does), a negative enum or union index
  counts from the end as a Python list index does, a negative block count is followed by a
  block size, a boolean is any non-zero byte. What it raises is not fastavro's exception (an
  ``IndexError`` where fastavro says ``EOFError``): the caller reports either as an invalid body.

Supported: record (nested), null, boolean, int, long, float, double, string, bytes, enum, map,
array and unions, with named types referred to by name. Anything else (``fixed``, a
``logicalType``, a recursive record, an array whose items can take no bytes) raises
:class:`Unsupported`: that schema keeps fastavro.

**Columns.** :func:`compile_columns` writes a third function for a batch given as columns
instead of a dict per record (what the scorer has: one list per field, from its arrays), so that
no record dict is built to be taken apart again: ``encode_columns(columns, n, header) ->
list[bytes]``, ``header + `` the body of each of the ``n`` records. ``columns`` maps each field
name to a list of ``n`` values, a :class:`Constant` (the same value in every record: encoded
once), a :class:`MapMatrix` (a map field whose records share their keys, the values a numpy
array: encoded with numpy), or, for a field whose type is a record, a mapping of that record's
fields in the same way. Each record's bytes are those ``encode`` gives for the record
:func:`column_rows` builds from the same columns, so fastavro's (tests/unit/test_compiled_codec.py
proves both), or it raises and the caller encodes :func:`column_rows`' records one by one. The
function is generated once per schema and layout (which fields are lists, constants, matrices).

Map keys' encodings are cached (up to 4,096 distinct keys per codec); a ``str`` subclass whose
``encode`` is not ``str.encode`` is, as a map key, encoded as the plain string would be.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from triage.bus.errors import BadRecord, ConfigurationError

__all__ = ["CompiledCodec", "Constant", "Fallback", "MapMatrix", "Unsupported",
           "column_rows", "compile_columns", "compile_schema", "layout_of"]

Encoder = Callable[[Any], bytes]
Decoder = Callable[[bytes, int], tuple[dict[str, Any], int]]

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes",
                         "string"})
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_MASK64 = (1 << 64) - 1
_KEY_CACHE_SIZE = 4096


class Unsupported(ConfigurationError):
    """The schema uses something the generated codecs do not do: keep fastavro for it (the
    codec catches it; a ConfigurationError, the project's kind for a file that cannot be used,
    should it ever escape)."""


class Fallback(BadRecord):
    """The compiled encoder cannot be sure of fastavro's bytes for this one record: write it
    with fastavro (the codec catches it; it never reaches a dead-letter topic)."""

    def __init__(self, message: str = "the generated encoder gives way to fastavro") -> None:
        super().__init__("compiled_codec_fallback", message)


@dataclass(frozen=True)
class CompiledCodec:
    """The generated functions and their source (for reading, and for tracebacks)."""

    encode: Encoder
    decode: Decoder
    source: str


@dataclass(frozen=True)
class Constant:
    """A column with the same value in every record (encoded once a batch)."""

    value: Any


@dataclass(frozen=True)
class MapMatrix:
    """A column of a map field whose records share their keys: record ``i`` holds
    ``dict(zip(keys, values[i].tolist()))``. ``keys``: distinct strings, in the maps' order;
    ``values``: a numpy array of shape (records, len(keys)), float32 for a map of ``float``,
    float64 for a map of ``double`` (any other map or dtype: the records are encoded one by
    one)."""

    keys: tuple[str, ...]
    values: np.ndarray


Layout = tuple[tuple[str, Any], ...]
"""Which columns of a batch are lists ("list"), constants ("constant"), map matrices
("matrix") or a record's own columns (a nested Layout), by field name, sorted."""


def layout_of(columns: Any) -> Layout:
    """The :data:`Layout` of a mapping of columns (see :func:`compile_columns`)."""
    out = []
    for name, column in columns.items():
        if isinstance(column, Constant):
            kind: Any = "constant"
        elif isinstance(column, MapMatrix):
            kind = "matrix"
        elif isinstance(column, dict):
            kind = layout_of(column)
        else:
            kind = "list"
        out.append((name, kind))
    return tuple(sorted(out))


def column_rows(columns: Any, n: int) -> list[dict[str, Any]]:
    """The ``n`` records that ``columns`` (field name -> a list of ``n`` values, a
    :class:`Constant`, a :class:`MapMatrix` or a mapping of a record field's columns) hold, as
    dicts: what the generated columns encoder writes, record by record. A Constant's value is
    the same object in every record (read-only, as records to encode are)."""
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for name, column in columns.items():
        if isinstance(column, Constant):
            values: Any = [column.value] * n
        elif isinstance(column, MapMatrix):
            values = [dict(zip(column.keys, row, strict=True)) for row in column.values.tolist()]
        elif isinstance(column, dict):
            values = column_rows(column, n)
        else:
            values = column
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} values for {n} records")
        for row, value in zip(rows, values, strict=True):
            row[name] = value
    return rows


def _matrix_rows(column: Any, n: int, double: bool) -> list[bytes]:
    """The Avro bytes of each record's map in a :class:`MapMatrix` (one block of every key,
    then the end), built with numpy; Fallback for anything but the documented shapes and
    dtypes, and for a NaN (fastavro packs NaN payloads through a double)."""
    if column.__class__ is not MapMatrix:
        raise Fallback
    keys, values = column.keys, column.values
    dtype = np.dtype(np.float64 if double else np.float32)
    if (values.__class__ is not np.ndarray or values.dtype != dtype
            or values.shape != (n, len(keys)) or len(set(keys)) != len(keys)
            or any(k.__class__ is not str for k in keys)):
        raise Fallback
    if not keys:
        return [b"\x00"] * n
    if n == 0:
        return []
    if np.isnan(values).any():
        raise Fallback
    width = 8 if double else 4
    encoded = [k.encode() for k in keys]
    pieces = [_SMALL[len(keys)] if len(keys) < 8192 else _long(len(keys))]
    pieces += [_LENGTHS[len(e)] + e for e in encoded]
    size = sum(map(len, pieces)) + width * len(keys) + 1
    rows = np.empty((n, size), dtype=np.uint8)
    at = len(pieces[0])
    rows[:, :at] = np.frombuffer(pieces[0], dtype=np.uint8)
    little = dtype.newbyteorder("<")
    for j, key in enumerate(pieces[1:]):
        rows[:, at:at + len(key)] = np.frombuffer(key, dtype=np.uint8)
        at += len(key)
        rows[:, at:at + width] = np.ascontiguousarray(values[:, j], dtype=little).view(
            np.uint8).reshape(n, width)
        at += width
    rows[:, at] = 0
    raw = rows.tobytes()
    return [raw[i:i + size] for i in range(0, n * size, size)]


# --- Varints: tables for the common sizes, a loop of 14-bit chunks beyond. -------------------

def _varint(z: int) -> bytes:
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


# _U14[z]: the varint of z < 2**14 (1 or 2 bytes); _C14[z]: z's two 7-bit groups, both marked
# "more follows"; _SMALL[n]: the zigzag varint of n for -2**13 <= n < 2**13.
_U14 = [_varint(z) for z in range(1 << 14)]
_C14 = [bytes(((z & 0x7F) | 0x80, (z >> 7) | 0x80)) for z in range(1 << 14)]
_SMALL = {n: _U14[(n << 1) ^ (n >> 63)] for n in range(-(1 << 13), 1 << 13)}
# _ZZ[b]: the value of the one-byte varint b < 0x80.
_ZZ = tuple((b >> 1) ^ -(b & 1) for b in range(0x80))


def _long(n: Any) -> bytes:
    """The zigzag varint of a long beyond ``_SMALL``: a plain int in 64 bits, else Fallback
    (fastavro converts floats and numpy integers its own way)."""
    if n.__class__ is not int:
        raise Fallback
    z = n << 1 if n >= 0 else ~(n << 1)
    if z < 0x10000000:  # 2**28
        if z < 0x4000:
            return _U14[z]
        return _C14[z & 0x3FFF] + _U14[z >> 14]
    if z < 0x40000000000:  # 2**42 (z is 2n): epoch milliseconds until 2039
        return _C14[z & 0x3FFF] + _C14[(z >> 14) & 0x3FFF] + _U14[z >> 28]
    if z < 0x100000000000000:  # 2**56
        return (_C14[z & 0x3FFF] + _C14[(z >> 14) & 0x3FFF] + _C14[(z >> 28) & 0x3FFF]
                + _U14[z >> 42])
    if z >> 64:
        raise Fallback  # beyond 64 bits: fastavro's OverflowError
    out = b""
    while z >= 0x4000:
        out += _C14[z & 0x3FFF]
        z >>= 14
    return out + _U14[z]


# _LEN[n]: the varint of a length n < 2**13, the fastest lookup there is; a longer string or
# bytes value raises IndexError, and the encoder starts again with _LENGTHS, which takes any.
_LEN = [_SMALL[n] for n in range(1 << 13)]


class _Lengths(dict[int, bytes]):
    def __missing__(self, n: int) -> bytes:
        return _long(n)


_LENGTHS = _Lengths(enumerate(_LEN))


_pack_f = struct.Struct("<f").pack
_pack_d = struct.Struct("<d").pack
_unpack_f = struct.Struct("<f").unpack_from
_unpack_d = struct.Struct("<d").unpack_from


def _float32(x: Any) -> bytes:
    """A float as fastavro writes it: a finite double beyond float32's range becomes an infinity
    (C's cast), where struct refuses. A number too large for a double stays an error (fastavro's
    too)."""
    try:
        return _pack_f(x)
    except OverflowError:
        return _pack_f(math.copysign(math.inf, float(x)))


def _read_long(d: bytes, p: int) -> tuple[int, int]:
    """A varint of two bytes or more at ``d[p]`` (a one-byte varint is read inline), as
    fastavro's C reader reads it; IndexError at the end of ``d``. Unrolled up to 6 bytes (epoch
    milliseconds take 6)."""
    n = d[p] & 0x7F
    b = d[p + 1]
    if b < 0x80:
        n |= b << 7
        return (n >> 1) ^ -(n & 1), p + 2
    n |= (b & 0x7F) << 7
    b = d[p + 2]
    if b < 0x80:
        n |= b << 14
        return (n >> 1) ^ -(n & 1), p + 3
    n |= (b & 0x7F) << 14
    b = d[p + 3]
    if b < 0x80:
        n |= b << 21
        return (n >> 1) ^ -(n & 1), p + 4
    n |= (b & 0x7F) << 21
    b = d[p + 4]
    if b < 0x80:
        n |= b << 28
        return (n >> 1) ^ -(n & 1), p + 5
    n |= (b & 0x7F) << 28
    b = d[p + 5]
    if b < 0x80:
        n |= b << 35
        return (n >> 1) ^ -(n & 1), p + 6
    return _read_varint(d, p)


def _read_varint(d: bytes, p: int) -> tuple[int, int]:
    """A varint of any length at ``d[p]``, as fastavro's C reader reads it: 7 bits a byte,
    shifted by 7 x (the byte's position) modulo 64 (the C shift's count), kept to 64 bits;
    then zigzag."""
    b = d[p]
    n = b & 0x7F
    s = 7
    p += 1
    while b & 0x80:
        b = d[p]
        p += 1
        n |= (b & 0x7F) << (s & 63)
        s += 7
    n &= _MASK64
    return (n >> 1) ^ -(n & 1), p


class _Short(BadRecord):
    """The body ends before a string or bytes value does (or its length is negative): an
    invalid Avro body (the codec reports it as DecodeError "invalid_avro")."""

    def __init__(self, size: int, left: int) -> None:
        super().__init__("invalid_avro", f"expected {size} bytes, {left} left")


def _new_key_cache() -> tuple[dict[str, bytes], Callable[[Any], bytes]]:
    cache: dict[str, bytes] = {}

    def key(k: Any) -> bytes:
        e: bytes = k.encode()
        kb = _LENGTHS[len(e)] + e
        if k.__class__ is str and len(cache) < _KEY_CACHE_SIZE:
            cache[k] = kb
        return kb

    return cache, key


# --- The schema, resolved ---------------------------------------------------------------------

def _named_types(schema: Any, names: dict[str, dict[str, Any]]) -> None:
    if isinstance(schema, list):
        for branch in schema:
            _named_types(branch, names)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind in ("record", "enum", "fixed", "error"):
            names.setdefault(schema["name"], schema)
        if kind in ("record", "error"):
            for field in schema.get("fields", ()):
                _named_types(field["type"], names)
        elif kind == "array":
            _named_types(schema["items"], names)
        elif kind == "map":
            _named_types(schema["values"], names)
        elif isinstance(kind, (dict, list)):
            _named_types(kind, names)


class _Generator:
    """Writes the source of one schema's encoder and decoder."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.names: dict[str, dict[str, Any]] = {}
        _named_types(schema, self.names)
        self.consts: dict[str, Any] = {}
        self.counter = 0
        self.records_open: list[str] = []
        # One cache of map keys' encodings for every map of the schema.
        self.consts["_KEYS"], self.consts["_key"] = _new_key_cache()

    # Schema nodes -----------------------------------------------------------------------------

    def node(self, schema: Any) -> tuple[str, Any]:
        """(kind, schema node) with named references and {"type": primitive} resolved."""
        if isinstance(schema, list):
            return "union", schema
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return schema, schema
            if schema in self.names:
                return self.node(self.names[schema])
            raise Unsupported(f"unknown type {schema!r}")
        if not isinstance(schema, dict):
            raise Unsupported(f"not a schema: {schema!r}")
        if "logicalType" in schema:
            raise Unsupported(f"logical type {schema['logicalType']!r}")
        kind = schema.get("type")
        if isinstance(kind, str) and kind in _PRIMITIVES:
            return kind, kind
        if kind in ("record", "enum", "array", "map"):
            return kind, schema
        if isinstance(kind, (dict, list)):
            return self.node(kind)
        raise Unsupported(f"type {kind!r}")

    def can_be_empty(self, schema: Any, seen: frozenset[str] = frozenset()) -> bool:
        """True when a value of ``schema`` can be written as no bytes at all."""
        kind, node = self.node(schema)
        if kind == "null":
            return True
        if kind == "record":
            if node["name"] in seen:
                return False
            return all(self.can_be_empty(f["type"], seen | {node["name"]})
                       for f in node["fields"])
        return False

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def const(self, prefix: str, value: Any) -> str:
        for existing, known in self.consts.items():
            if known == value and type(known) is type(value) and existing.startswith(prefix):
                return existing
        name = self.name(prefix)
        self.consts[name] = value
        return name

    def open_record(self, node: dict[str, Any]) -> None:
        if node["name"] in self.records_open:
            raise Unsupported(f"recursive record {node['name']}")
        self.records_open.append(node["name"])

    # Encoder ------------------------------------------------------------------------------------
    #
    # write(schema, var, strict, out) appends statements to `out` and returns the expressions
    # of the value's bytes, in order. `strict`: the value sits in a union branch, where fastavro
    # chose the branch by validating the value; the generated code then refuses (Fallback) any
    # value that validation would not accept, so that a branch written here is one fastavro
    # chose. Outside unions fastavro does not validate and neither does this code: it writes
    # what fastavro's writers write, or raises.

    def write(self, schema: Any, var: str, strict: bool, out: list[str], ind: str,
              float32: str = "", checked: bool = False) -> list[str]:
        """``float32``: the function that packs a float there: by default ``_float32``, which
        makes a double beyond float32's range an infinity; in a map's first pass ``_pack_f``,
        whose OverflowError sends the map to a second pass with ``_float32``.
        ``checked``: a union's dispatch has already checked the value's class (and an
        integer's range) for this branch."""
        kind, node = self.node(schema)
        strict = strict and not (checked and kind in _PRIMITIVES)
        if kind == "null":
            if strict:
                out.append(f"{ind}if {var} is not None: raise Fallback")
            return []
        if kind == "boolean":
            if strict:
                out.append(f"{ind}if {var}.__class__ is not bool: raise Fallback")
            return [f'(b"\\x01" if {var} else b"\\x00")']
        if kind in ("int", "long"):
            if strict:
                low, high = (_INT_MIN, _INT_MAX) if kind == "int" else (_LONG_MIN, _LONG_MAX)
                out.append(f"{ind}if {var}.__class__ is not int or not {low} <= {var} <= "
                           f"{high}: raise Fallback")
            return [f"(_SMALL.get({var}) or _long({var}))"]
        if kind == "float":
            if strict:
                out.append(f"{ind}if {var}.__class__ is not float and {var}.__class__ is not "
                           f"int: raise Fallback")
            if float32:
                return [f"{float32}({var})"]
            return [f"_float32({var})"]
        if kind == "double":
            if strict:
                out.append(f"{ind}if {var}.__class__ is not float and {var}.__class__ is not "
                           f"int: raise Fallback")
            return [f"_pack_d({var})"]
        if kind == "string":
            if strict:
                out.append(f"{ind}if {var}.__class__ is not str: raise Fallback")
            encoded = self.name("s")
            out.append(f"{ind}{encoded} = {var}.encode()")
            return [f"_LEN[len({encoded})]", encoded]
        if kind == "bytes":
            out.append(f"{ind}if {var}.__class__ is not bytes: raise Fallback")
            return [f"_LEN[len({var})]", var]
        if kind == "enum":
            symbols = self.const("_E", {s: _SMALL[i] for i, s in enumerate(node["symbols"])})
            return [f"{symbols}[{var}]"]
        if kind == "record":
            return self.write_record(node, var, strict, out, ind)
        if kind == "array":
            return [self.write_array(node, var, strict, out, ind)]
        if kind == "map":
            return [self.write_map(node, var, strict, out, ind)]
        return [self.write_union(node, var, out, ind)]

    def write_record(self, node: dict[str, Any], var: str, strict: bool, out: list[str],
                     ind: str) -> list[str]:
        self.open_record(node)
        out.append(f"{ind}if {var}.__class__ is not dict: raise Fallback")
        if strict:  # fastavro's validation refuses a record naming another type
            out.append(f'{ind}if "-type" in {var}: raise Fallback')
        pieces: list[str] = []
        for field in node["fields"]:
            value = self.name("v")
            out.append(f"{ind}{value} = {var}[{field['name']!r}]")
            pieces += self.write(field["type"], value, strict, out, ind)
        self.records_open.pop()
        return pieces

    def write_array(self, node: dict[str, Any], var: str, strict: bool, out: list[str],
                    ind: str) -> str:
        if self.can_be_empty(node["items"]):
            raise Unsupported("an array whose items can take no bytes")
        result, parts, size, item = (self.name("a"), self.name("l"), self.name("n"),
                                     self.name("x"))
        inner = ind + "        "
        body: list[str] = []
        pieces = self.write(node["items"], item, strict, body, inner)
        out += [f"{ind}if {var}.__class__ is not list: raise Fallback",
                f"{ind}{size} = len({var})",
                f"{ind}if {size}:",
                f"{ind}    {parts} = [_SMALL[{size}] if {size} < 8192 else _long({size})]",
                f"{ind}    for {item} in {var}:",
                *body,
                f"{inner}{parts} += ({', '.join(pieces)},)" if pieces else f"{inner}pass",
                f'{ind}    {parts}.append(b"\\x00")',
                f'{ind}    {result} = b"".join({parts})',
                f"{ind}else:",
                f'{ind}    {result} = b"\\x00"']
        return result

    def write_map(self, node: dict[str, Any], var: str, strict: bool, out: list[str],
                  ind: str) -> str:
        result, parts, size, key, value = (self.name("a"), self.name("l"), self.name("n"),
                                           self.name("k"), self.name("x"))
        inner = ind + "        "

        def loop(at: str, float32: str) -> list[str]:
            body: list[str] = []
            if strict:
                body.append(f"{at}    if {key}.__class__ is not str: raise Fallback")
            pieces = [f"_KEYS.get({key}) or _key({key})",
                      *self.write(node["values"], value, strict, body, at + "    ", float32)]
            return [f"{at}{parts} = [_SMALL[{size}] if {size} < 8192 else _long({size})]",
                    f"{at}for {key}, {value} in {var}.items():",
                    *body,
                    f"{at}    {parts} += ({', '.join(pieces)},)",
                    f'{at}{parts}.append(b"\\x00")',
                    f'{at}{result} = b"".join({parts})']

        if self.node(node["values"])[0] == "float":
            # A float beyond float32's range (an infinity in fastavro's bytes) is rare enough
            # for a second pass.
            body = [f"{ind}    try:", *loop(inner, "_pack_f"),
                    f"{ind}    except OverflowError:", *loop(inner, "_float32")]
        else:
            body = loop(ind + "    ", "_pack_f")
        out += [f"{ind}if {var}.__class__ is not dict: raise Fallback",
                f"{ind}{size} = len({var})",
                f"{ind}if {size}:",
                *body,
                f"{ind}else:",
                f'{ind}    {result} = b"\\x00"']
        return result

    def write_union(self, branches: list[Any], var: str, out: list[str], ind: str) -> str:
        """The union's bytes (branch index, then the value) in one variable, the branch chosen
        as fastavro's write_union chooses it, for values of the plain Python types; any other
        value is Fallback."""
        kinds = [self.node(branch)[0] for branch in branches]
        if "union" in kinds:
            raise Unsupported("a union directly inside a union")
        result = self.name("u")

        def first(*wanted: str) -> int | None:
            return next((i for i, kind in enumerate(kinds) if kind in wanted), None)

        def numeric(i: int) -> int:
            # fastavro: a float branch that validates gives way to a later double branch.
            if kinds[i] == "float":
                return next((j for j in range(i + 1, len(kinds)) if kinds[j] == "double"), i)
            return i

        def take(i: int, at: str) -> list[str]:
            lines: list[str] = []
            pieces = [repr(_SMALL[i]), *self.write(branches[i], var, True, lines, at, checked=True)]
            joined = (pieces[0] if len(pieces) == 1 else
                      f"{pieces[0]} + {pieces[1]}" if len(pieces) == 2 else
                      f'b"".join(({", ".join(pieces)},))')
            return [*lines, f"{at}{result} = {joined}"]

        body = ind + "    "
        cases: list[tuple[str, list[str]]] = []
        null = first("null")
        if null is not None:
            cases.append((f"{var} is None", take(null, body)))
        boolean = first("boolean")
        if boolean is not None:
            cases.append((f"{var}.__class__ is bool", take(boolean, body)))
        # An int: the first of int (in range), long (in range), float or double.
        chain: list[str] = []
        depth = body
        for i, kind in enumerate(kinds):
            if kind in ("int", "long"):
                low, high = (_INT_MIN, _INT_MAX) if kind == "int" else (_LONG_MIN, _LONG_MAX)
                chain += [f"{depth}if {low} <= {var} <= {high}:", *take(i, depth + "    "),
                          f"{depth}else:"]
                depth += "    "
            elif kind in ("float", "double"):
                chain += take(numeric(i), depth)
                break
        else:
            chain.append(f"{depth}raise Fallback")
        if any(kind in ("int", "long", "float", "double") for kind in kinds):
            cases.append((f"{var}.__class__ is int", chain))
        number = first("float", "double")
        if number is not None:
            cases.append((f"{var}.__class__ is float", take(numeric(number), body)))
        # A str: the first string branch, or an enum branch holding it.
        text: list[str] = []
        depth = body
        for i, kind in enumerate(kinds):
            if kind == "string":
                text += take(i, depth)
                break
            if kind == "enum":
                symbols = self.const("_E", {s: _SMALL[j] for j, s in
                                            enumerate(self.node(branches[i])[1]["symbols"])})
                text += [f"{depth}if {var} in {symbols}:", *take(i, depth + "    "),
                         f"{depth}else:"]
                depth += "    "
        else:
            text.append(f"{depth}raise Fallback")
        if any(kind in ("string", "enum") for kind in kinds):
            cases.append((f"{var}.__class__ is str", text))
        # bytes validate as an array of numbers too: with an array branch, fastavro decides.
        if "bytes" in kinds and "array" not in kinds:
            cases.append((f"{var}.__class__ is bytes", take(kinds.index("bytes"), body)))
        if kinds.count("array") == 1:
            cases.append((f"{var}.__class__ is list", take(kinds.index("array"), body)))
        # A dict: one record or one map branch; with more, fastavro's count of matching fields
        # decides.
        mappings = [i for i, kind in enumerate(kinds) if kind in ("record", "map")]
        if len(mappings) == 1:
            cases.append((f"{var}.__class__ is dict", take(mappings[0], body)))
        order = ("is None", "is float", "is str", "is int", "is bool", "is bytes", "is list",
                 "is dict")
        cases.sort(key=lambda case: next(n for n, end in enumerate(order)
                                         if case[0].endswith(end)))
        for n, (condition, lines) in enumerate(cases):
            out.append(f"{ind}{'if' if n == 0 else 'elif'} {condition}:")
            out += lines
        out.append(f"{ind}{'else:' if cases else 'if True:'}")
        out.append(f"{ind}    raise Fallback")
        return result

    # Decoder ------------------------------------------------------------------------------------
    #
    # read(schema, var, out, ind) appends statements that read one value into `var`, advancing
    # the position `p` in the bytes `d` (of length `L`).

    def read_long(self, var: str, out: list[str], ind: str) -> None:
        byte = self.name("b")
        out += [f"{ind}{byte} = d[p]",
                f"{ind}if {byte} < 128:",
                f"{ind}    {var} = _ZZ[{byte}]",
                f"{ind}    p += 1",
                f"{ind}else:",
                f"{ind}    {var}, p = _read_long(d, p)"]

    def read(self, schema: Any, var: str, out: list[str], ind: str) -> None:
        kind, node = self.node(schema)
        if kind == "null":
            out.append(f"{ind}{var} = None")
        elif kind == "boolean":
            out += [f"{ind}{var} = d[p] != 0", f"{ind}p += 1"]
        elif kind in ("int", "long"):
            self.read_long(var, out, ind)
        elif kind in ("float", "double"):
            unpack, width = ("_unpack_f", 4) if kind == "float" else ("_unpack_d", 8)
            out += [f"{ind}{var} = {unpack}(d, p)[0]", f"{ind}p += {width}"]
        elif kind in ("string", "bytes"):
            size, end = self.name("n"), self.name("e")
            self.read_long(size, out, ind)
            out += [f"{ind}{end} = p + {size}",
                    f"{ind}if {size} < 0 or {end} > L: raise _Short({size}, L - p)",
                    f"{ind}{var} = d[p:{end}]{'.decode()' if kind == 'string' else ''}",
                    f"{ind}p = {end}"]
        elif kind == "enum":
            symbols = self.const("_S", tuple(node["symbols"]))
            index = self.name("i")
            self.read_long(index, out, ind)
            out.append(f"{ind}{var} = {symbols}[{index}]")  # a list index, as fastavro's
        elif kind == "record":
            self.open_record(node)
            values = []
            for field in node["fields"]:
                value = self.name("v")
                self.read(field["type"], value, out, ind)
                values.append(f"{field['name']!r}: {value}")
            self.records_open.pop()
            out.append(f"{ind}{var} = {{{', '.join(values)}}}")
        elif kind in ("array", "map"):
            self.read_blocks(kind, node, var, out, ind)
        else:
            self.read_union(node, var, out, ind)

    def read_blocks(self, kind: str, node: dict[str, Any], var: str, out: list[str],
                    ind: str) -> None:
        if kind == "array" and self.can_be_empty(node["items"]):
            raise Unsupported("an array whose items can take no bytes")
        count, skipped, item, key = (self.name("c"), self.name("z"), self.name("x"),
                                     self.name("k"))
        out.append(f"{ind}{var} = {'[]' if kind == 'array' else '{}'}")
        self.read_long(count, out, ind)
        out += [f"{ind}while {count}:",
                f"{ind}    if {count} < 0:",
                # fastavro negates in 64 bits: -(-2**63) stays negative, a block of no items.
                f"{ind}        {count} = -{count} if {count} != {_LONG_MIN} else 0"]
        self.read_long(skipped, out, ind + "        ")  # the block's size in bytes, unused
        out.append(f"{ind}    for _ in range({count}):")
        inner = ind + "        "
        if kind == "array":
            self.read(node["items"], item, out, inner)
            out.append(f"{inner}{var}.append({item})")
        else:
            self.read("string", key, out, inner)
            self.read(node["values"], item, out, inner)
            out.append(f"{inner}{var}[{key}] = {item}")
        self.read_long(count, out, ind + "    ")

    def read_union(self, branches: list[Any], var: str, out: list[str], ind: str) -> None:
        index = self.name("i")
        self.read_long(index, out, ind)
        size = len(branches)
        for i, branch in enumerate(branches):
            # A Python list index, as fastavro's: -1 is the last branch.
            out.append(f"{ind}{'if' if i == 0 else 'elif'} {index} == {i} or {index} == "
                       f"{i - size}:")
            self.read(branch, var, out, ind + "    ")
        out += [f"{ind}else:",
                f"{ind}    raise IndexError(f'union branch {{{index}}} of {size}')"]


def _write_columns(generator: _Generator, node: dict[str, Any], var: str, layout: Layout,
                   setup: list[str], body: list[str], loop: list[tuple[str, str]]) -> list[str]:
    """The pieces of a record given as columns ``var`` laid out as ``layout``: statements that
    run once a batch go to ``setup``, those of each record to ``body``; (list, loop variable)
    pairs to ``loop``."""
    generator.open_record(node)
    kinds = dict(layout)
    if set(kinds) != {f["name"] for f in node["fields"]}:
        raise Unsupported("the columns are not the record's fields")
    pieces: list[str] = []
    once, each = "        ", "            "
    for field in node["fields"]:
        kind, column = kinds[field["name"]], generator.name("q")
        setup.append(f"{once}{column} = {var}[{field['name']!r}]")
        if isinstance(kind, tuple):  # a record's own columns
            if generator.node(field["type"])[0] != "record":
                raise Unsupported(f"columns for {field['name']!r}, not a record")
            setup.append(f"{once}if {column}.__class__ is not dict: raise Fallback")
            pieces += _write_columns(generator, generator.node(field["type"])[1], column, kind,
                                     setup, body, loop)
        elif kind == "constant":
            value, encoded = generator.name("v"), generator.name("K")
            setup += [f"{once}if {column}.__class__ is not Constant: raise Fallback",
                      f"{once}{value} = {column}.value"]
            constant = generator.write(field["type"], value, False, setup, once)
            setup.append(f'{once}{encoded} = b"".join(({"".join(f"{c}, " for c in constant)}))')
            pieces.append(encoded)
        elif kind == "matrix":
            map_kind, map_node = generator.node(field["type"])
            values = generator.node(map_node["values"])[0] if map_kind == "map" else ""
            if values not in ("float", "double"):
                raise Unsupported(f"a matrix for {field['name']!r}, not a map of float or double")
            value, rows = generator.name("v"), generator.name("m")
            setup.append(f"{once}{rows} = _matrix_rows({column}, n, {values == 'double'})")
            loop.append((rows, value))
            pieces.append(value)
        else:
            value = generator.name("v")
            setup.append(f"{once}if {column}.__class__ is not list or len({column}) != n: "
                         "raise Fallback")
            loop.append((column, value))
            pieces += generator.write(field["type"], value, False, body, each)
    generator.records_open.pop()
    return pieces


def compile_columns(schema: dict[str, Any], layout: Layout) -> tuple[Any, str]:
    """(``encode_columns``, its source) for a parsed record schema and a columns layout (see
    the module docstring and :func:`layout_of`). Raises :class:`Unsupported` for a schema the
    generator does not take or a layout that does not fit the schema."""
    generator = _Generator(schema)
    kind, node = generator.node(schema)
    if kind != "record":
        raise Unsupported("the schema is not a record")
    setup: list[str] = []
    body: list[str] = []
    loop: list[tuple[str, str]] = []
    pieces = _write_columns(generator, node, "c", layout, setup, body, loop)
    if loop:
        head = (f"        for {', '.join(v for _, v in loop)}{',' if len(loop) == 1 else ''} "
                f"in zip({', '.join(c for c, _ in loop)}):")
    else:
        head = "        for _ in range(n):"
    lines = [*setup, "        out = []", "        add = out.append", head, *body,
             f'            add(b"".join((h, {"".join(f"{p}, " for p in pieces)})))',
             "        return out"]
    long_values = [line.replace("_LEN[", "_LENGTHS[") for line in lines]
    source = "\n".join(["def encode_columns(c, n, h):", "    try:", *lines,
                        "    except IndexError:", *long_values, ""])
    namespace: dict[str, Any] = {
        "Fallback": Fallback, "Constant": Constant, "_matrix_rows": _matrix_rows,
        "_SMALL": _SMALL, "_LEN": _LEN, "_LENGTHS": _LENGTHS, "_long": _long,
        "_pack_f": _pack_f, "_pack_d": _pack_d, "_float32": _float32, **generator.consts}
    exec(compile(source, f"<avro columns encoder {node['name']}>", "exec"), namespace)
    return namespace["encode_columns"], source


def compile_schema(schema: dict[str, Any]) -> CompiledCodec:
    """The encoder and decoder of a parsed record schema. Raises :class:`Unsupported`."""
    generator = _Generator(schema)
    kind, node = generator.node(schema)
    if kind != "record":
        raise Unsupported("the schema is not a record")
    encoder: list[str] = []
    pieces = generator.write(node, "r", False, encoder, "        ")
    encoder.append(f'        return b"".join(({", ".join(pieces)},))')
    # The same code twice: the second, for a string or bytes value of 8 KiB or more.
    long_values = [line.replace("_LEN[", "_LENGTHS[") for line in encoder]
    decoder: list[str] = ["    L = len(d)"]
    generator.read(node, "r", decoder, "    ")
    source = "\n".join([
        "def encode(r):",
        "    try:",
        *encoder,
        "    except IndexError:",
        *long_values,
        "",
        "def decode(d, p):",
        *decoder,
        "    return r, p",
        ""])
    namespace: dict[str, Any] = {
        "Fallback": Fallback, "_SMALL": _SMALL, "_LEN": _LEN, "_LENGTHS": _LENGTHS,
        "_long": _long, "_pack_f": _pack_f, "_pack_d": _pack_d, "_float32": _float32,
        "_unpack_f": _unpack_f,
        "_unpack_d": _unpack_d, "_ZZ": _ZZ, "_read_long": _read_long, "_Short": _Short,
        **generator.consts}
    exec(compile(source, f"<avro codec {node['name']}>", "exec"), namespace)
    return CompiledCodec(namespace["encode"], namespace["decode"], source)
