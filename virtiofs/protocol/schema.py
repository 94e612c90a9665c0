"""Declarative wire structs: one typed declaration, a `construct` schema, and a struct fast path.

Every FUSE struct is declared once, as a ``NamedTuple`` whose field annotations carry the
``construct`` field type (``u64 = Annotated[int, Int64ul]``).  From that declaration this module
derives, at import time:

- ``schema(cls)``: the interpreted ``construct.Struct`` — the oracle, used by tests, the pretty
  printer and anyone who wants construct's introspection;
- ``codec(cls)``: a ``struct.Struct`` fast path generated from that schema (the schema's
  ``FormatField`` format strings concatenated), with ``unpack(buf, offset)`` returning an instance
  of ``cls`` and ``pack(obj)`` returning bytes.

Why not construct's ``compile()``: measured here, an interpreted parse of in_header+getattr_in
costs ~20 µs, compiled ~5 µs, a precompiled ``struct.Struct`` ~0.1 µs (shared/docs/FACTS.md), and
the construct docs warn that compiled parsers omit checks and must not see untrusted bytes.
Tests compare the two paths on every Hypothesis example.
"""

from __future__ import annotations

import struct
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple, TypeVar

import construct as cs

from ..errors import LocalProtocolError

u8 = Annotated[int, cs.Int8ul]
u16 = Annotated[int, cs.Int16ul]
u32 = Annotated[int, cs.Int32ul]
u64 = Annotated[int, cs.Int64ul]
s16 = Annotated[int, cs.Int16sl]
s32 = Annotated[int, cs.Int32sl]
s64 = Annotated[int, cs.Int64sl]


# Reserved arrays (``unused[11]``, ``__spare2[14]``) are declared ``Annotated[bytes, cs.Bytes(n)]``
# and kept as raw bytes rather than skipped, so a captured message re-encodes byte for byte; their
# default is zeros, so nothing we build leaks stale bytes (SECURITY.md B1 #10).


T = TypeVar("T", bound=tuple[Any, ...])


@dataclass(frozen=True)
class Codec:
    """The struct fast path of one declared struct."""

    cls: type[Any]
    size: int
    format: str
    unpack: Callable[..., Any]
    """``unpack(buf, offset=0) -> cls``; the caller guarantees ``size`` bytes are there."""
    pack: Callable[[Any], bytes]
    pack_into: Callable[..., None]
    """``pack_into(buf, offset, obj)``."""


_SCHEMAS: dict[type[Any], cs.Struct] = {}
_CODECS: dict[type[Any], Codec] = {}


def field_types(cls: type[Any]) -> list[tuple[str, Any]]:
    """``(name, construct type or nested struct class)`` of each field, in wire order."""
    found = _FIELD_TYPES.get(cls)
    if found is None:
        found = _FIELD_TYPES[cls] = _read_field_types(cls)
    return list(found)


_FIELD_TYPES: dict[type[Any], list[tuple[str, Any]]] = {}


def _read_field_types(cls: type[Any]) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for name in cls._fields:
        hint = hints[name]
        if typing.get_origin(hint) is Annotated:
            out.append((name, typing.get_args(hint)[1]))
        elif isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields"):
            out.append((name, hint))
        else:
            raise LocalProtocolError(f"{cls.__name__}.{name}: no wire type in {hint!r}")
    return out


def schema(cls: type[Any]) -> cs.Struct:
    """The construct ``Struct`` of a declared wire struct (cached)."""
    found = _SCHEMAS.get(cls)
    if found is None:
        parts = []
        for name, kind in field_types(cls):
            parts.append(name / (schema(kind) if isinstance(kind, type) else kind))
        found = cs.Struct(*parts)
        _SCHEMAS[cls] = found
    return found


def _format_of(con: Any) -> str:
    """The ``struct`` format of a construct field: the fast path is derived, never hand-kept."""
    if isinstance(con, cs.FormatField):
        return str(con.fmtstr[1:])
    if isinstance(con, cs.Renamed):
        return _format_of(con.subcon)
    if isinstance(con, cs.Bytes) and isinstance(con.length, int):
        return f"{con.length}s"
    if isinstance(con, cs.Struct):
        return "".join(_format_of(sub) for sub in con.subcons)
    raise LocalProtocolError(f"no struct format for {con!r}")


def flat_width(cls: type[Any]) -> int:
    """How many plain values ``cls`` occupies in its flattened ``struct`` tuple."""
    return sum(flat_width(kind) if isinstance(kind, type) else 1
               for _, kind in field_types(cls))


def flat_build_expr(cls: type[Any], var: str, start: int, env: dict[str, Any],
                    whole: bool = False) -> str:
    """Source of an expression building ``cls`` from ``var[start:start + flat_width(cls)]``.

    Used by the code generated here and in ``codec.py``: nested structs (entry_out.attr, statx
    times) are rebuilt from slices of one flat ``unpack`` tuple; a struct without nested members
    goes straight through ``tuple.__new__`` (no per-field work).  ``whole`` says ``var`` is
    exactly that tuple (no slice needed).  ``env`` receives the names the expression uses.
    """
    env["_new"] = tuple.__new__
    env[f"_c_{cls.__name__}"] = cls
    kinds = field_types(cls)
    if not any(isinstance(kind, type) for _, kind in kinds):
        if whole:
            return f"_new(_c_{cls.__name__}, {var})"
        return f"_new(_c_{cls.__name__}, {var}[{start}:{start + flat_width(cls)}])"
    getters = []
    index = start
    for _, kind in kinds:
        if isinstance(kind, type):
            getters.append(flat_build_expr(kind, var, index, env))
            index += flat_width(kind)
        else:
            getters.append(f"{var}[{index}]")
            index += 1
    return f"_new(_c_{cls.__name__}, ({', '.join(getters)},))"


def flat_pack_args(cls: type[Any], expr: str) -> list[str]:
    """Source of the flat ``struct.pack`` arguments of an instance ``expr`` of ``cls``."""
    kinds = field_types(cls)
    if not any(isinstance(kind, type) for _, kind in kinds):
        return [f"*{expr}"]
    out: list[str] = []
    for i, (_, kind) in enumerate(kinds):
        if isinstance(kind, type):
            out.extend(flat_pack_args(kind, f"{expr}[{i}]"))
        else:
            out.append(f"{expr}[{i}]")
    return out


def struct_format_of(kind: Any) -> str:
    """The ``struct`` format of one field's construct type (``Int64ul`` -> ``"Q"``)."""
    return _format_of(kind)


def struct_format(cls: type[Any]) -> str:
    """The ``struct`` format (without byte order) derived from the schema of ``cls``."""
    return _format_of(schema(cls))


def codec(cls: type[Any]) -> Codec:
    """The fast path of a declared wire struct (cached), generated from its schema."""
    found = _CODECS.get(cls)
    if found is not None:
        return found
    con = schema(cls)
    fmt = "<" + _format_of(con)
    packer = struct.Struct(fmt)
    if packer.size != con.sizeof():
        raise LocalProtocolError(f"{cls.__name__}: struct size {packer.size} != {con.sizeof()}")
    env: dict[str, Any] = {"_unpack": packer.unpack_from, "_pack": packer.pack,
                           "_pack_into": packer.pack_into}
    build = flat_build_expr(cls, "t", 0, env, whole=True)
    args = ", ".join(flat_pack_args(cls, "o"))
    body = (f"def unpack(buf, offset=0):\n t = _unpack(buf, offset)\n return {build}\n"
            f"def pack(o):\n return _pack({args})\n"
            f"def pack_into(buf, offset, o):\n _pack_into(buf, offset, {args})\n")
    exec(compile(body, f"<codec {cls.__name__}>", "exec"), env)
    found = Codec(cls, packer.size, fmt, env["unpack"], env["pack"], env["pack_into"])
    _CODECS[cls] = found
    return found


def sizeof(cls: type[Any]) -> int:
    """Wire size of a declared struct."""
    return codec(cls).size


def zero(cls: type[T]) -> T:
    """An all-zero instance of a declared struct."""
    c = codec(cls)
    result: T = c.unpack(bytes(c.size))
    return result


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build an instance from construct's parse result (or any mapping), nested included."""
    kwargs = {}
    for name, kind in field_types(cls):
        value = values[name]
        kwargs[name] = from_dict(kind, value) if isinstance(kind, type) else value
    return cls(**kwargs)


def to_dict(obj: NamedTuple) -> dict[str, Any]:
    """The nested dict construct's ``build`` takes."""
    out: dict[str, Any] = {}
    for name, value in zip(obj._fields, obj, strict=True):
        out[name] = to_dict(value) if hasattr(value, "_fields") else value
    return out
