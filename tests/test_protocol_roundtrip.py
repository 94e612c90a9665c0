"""Round trips for every opcode in both directions, every notification, dirents and extensions,
with the struct fast path checked against the construct schema (the oracle) on every example.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtiofs.errors import ProtocolError
from virtiofs.protocol import (
    NOTIFICATIONS,
    OPCODES,
    NotifyCode,
    Opcode,
    codec,
    decode_dirents,
    decode_notify,
    decode_reply,
    decode_request,
    decoder_for,
    encode_dirents,
    encode_reply_parts,
    schema,
    validate_reply,
)
from virtiofs.protocol import strategies as PS
from virtiofs.protocol import structs as S
from virtiofs.protocol.extensions import decode_extensions, encode_extensions
from virtiofs.protocol.schema import field_types, from_dict, to_dict

CODEC = sys.modules["virtiofs.protocol.codec"]
EXAMPLES = int(os.environ.get("VIRTIOFS_HYPOTHESIS_EXAMPLES", "10"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ALL_OPS = list(OPCODES)


def assert_schema_agrees(value: Any) -> None:
    """The fast path (struct) and the oracle (construct) build and parse ``value`` alike."""
    cls = type(value)
    packed = codec(cls).pack(value)
    assert schema(cls).build(to_dict(value)) == packed
    assert from_dict(cls, schema(cls).parse(packed)) == value
    assert codec(cls).unpack(packed) == value


def structs_in(obj: Any) -> list[Any]:
    if isinstance(obj, tuple) and hasattr(obj, "_fields") and type(obj) in S.SIZES:
        return [obj]
    if isinstance(obj, tuple | list):
        return [s for x in obj for s in structs_in(x)]
    return []


@pytest.mark.parametrize("opcode", ALL_OPS, ids=lambda o: o.name)
@SETTINGS
@given(data=st.data())
def test_request_round_trip(opcode: Opcode, data: st.DataObject) -> None:
    ex = data.draw(PS.requests([opcode]))
    raw = ex.encode()
    req = decode_request(raw, minor=ex.minor, flags=ex.flags)
    assert req.header.len == len(raw) and req.header.opcode == opcode
    assert (req.unique, req.nodeid) == (ex.unique, ex.nodeid)
    assert (req.header.uid, req.header.gid, req.header.pid) == (ex.uid, ex.gid, ex.pid)
    assert req.arg == ex.arg
    assert req.names == ex.names
    assert bytes(req.data) == ex.data
    assert req.items == ex.items
    assert req.ext == ex.ext
    # The fast path and the careful path agree, whatever the buffer type.
    assert CODEC._decode_generic(raw, ex.minor, ex.flags) == req
    assert decode_request(memoryview(bytearray(raw)), minor=ex.minor, flags=ex.flags) == req
    assert decoder_for(ex.minor, ex.flags)(raw) == req
    # Every struct on the wire parses the same with construct.
    assert from_dict(S.InHeader, schema(S.InHeader).parse(raw[:40])) == req.header
    for value in [req.header, *structs_in(req.arg), *req.items]:
        assert_schema_agrees(value)


@pytest.mark.parametrize("opcode", ALL_OPS, ids=lambda o: o.name)
@SETTINGS
@given(data=st.data())
def test_reply_round_trip(opcode: Opcode, data: st.DataObject) -> None:
    req_ex, rep_ex = data.draw(PS.exchanges([opcode]))
    if rep_ex is None:
        assert OPCODES[opcode].no_reply
        return
    request = req_ex.decode()
    parts = encode_reply_parts(request.spec, request.unique, rep_ex.result, rep_ex.minor) \
        if not rep_ex.error else [rep_ex.encode()]
    raw = b"".join(parts)
    assert raw == rep_ex.encode()
    assert struct.unpack_from("<I", raw)[0] == len(raw)
    if not rep_ex.error:
        slow = CODEC._encode_reply_generic(request.spec, request.unique, rep_ex.result,
                                           rep_ex.minor)
        assert b"".join(slow) == raw
    xattr = request.arg.size if opcode in (Opcode.GETXATTR, Opcode.LISTXATTR) else None
    reply = decode_reply(opcode, raw, minor=rep_ex.minor, xattr_size=xattr)
    assert reply.unique == request.unique and reply.error == rep_ex.error
    if not rep_ex.error:
        shape = request.spec.reply
        expected = rep_ex.result if len(shape) > 1 else (rep_ex.result,) if shape else ()
        assert tuple(bytes(p) if isinstance(p, bytes | bytearray | memoryview) else p
                     for p in expected) == reply.parts
        for value in structs_in(reply.parts):
            assert_schema_agrees(value)
    # Every reply the strategies call valid passes the kernel's rules (SECURITY.md B6 #9).
    validate_reply(request, raw, minor=req_ex.minor, flags=req_ex.flags)


@pytest.mark.parametrize("code", list(NOTIFICATIONS), ids=lambda c: c.name)
@SETTINGS
@given(data=st.data())
def test_notification_round_trip(code: NotifyCode, data: st.DataObject) -> None:
    ex = data.draw(PS.notifications([code]))
    raw = ex.encode()
    note = decode_notify(raw)
    assert (note.code, note.arg, note.name, note.data, note.nodeids) == (
        ex.code, ex.arg, ex.name, ex.data, ex.nodeids)
    head = codec(S.OutHeader).unpack(raw)
    assert head == S.OutHeader(len(raw), int(code), 0)
    for value in structs_in(note.arg):
        assert_schema_agrees(value)


@pytest.mark.parametrize("plus", [False, True], ids=["dirent", "direntplus"])
@SETTINGS
@given(data=st.data())
def test_dirents_round_trip(plus: bool, data: st.DataObject) -> None:
    entries = data.draw(PS.dirents(plus))
    raw = encode_dirents(entries, plus=plus)
    assert len(raw) % 8 == 0
    back = decode_dirents(raw, plus, strict=True)
    want = [e if plus else e._replace(entry=None) for e in entries]
    if plus:
        want = [e._replace(entry=e.entry or S.EntryOut()) for e in want]
    assert back == want
    # A limit cuts at a record boundary, never inside one.
    limit = data.draw(st.integers(0, len(raw)))
    cut = encode_dirents(entries, limit=limit, plus=plus)
    assert len(cut) <= limit and raw.startswith(cut)
    assert decode_dirents(cut, plus, strict=True) == back[:len(decode_dirents(cut, plus))]


@SETTINGS
@given(PS.extensions())
def test_extensions_round_trip(exts: tuple[Any, ...]) -> None:
    raw = encode_extensions(exts)
    assert len(raw) % 8 == 0
    assert decode_extensions(raw) == exts


# --- padding: nothing we build carries stale or arbitrary bytes (SECURITY.md B1 #10) -------

RESERVED = ("padding", "dummy", "unused", "spare", "reserved")


def _filled(cls: type) -> Any:
    """An instance with every field that has no default set to a non-zero value."""
    defaults = getattr(cls, "_field_defaults", {})
    values = {}
    for name, kind in field_types(cls):
        if name in defaults:
            continue
        values[name] = _filled(kind) if isinstance(kind, type) else 0xFF
    return cls(**values)


@pytest.mark.parametrize("cls", sorted(S.SIZES, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_defaults_leave_reserved_fields_zero(cls: type) -> None:
    packed = codec(cls).pack(_filled(cls))
    defaults = getattr(cls, "_field_defaults", {})
    spans = [span for span, name in _reserved_spans_named(cls) if name in defaults or "." in name]
    for start, end in spans:
        assert packed[start:end] == bytes(end - start), (cls.__name__, start)


def _reserved_spans_named(cls: type, base: int = 0,
                          prefix: str = "") -> list[tuple[tuple[int, int], str]]:
    spans = []
    at = base
    for (name, kind), sub in zip(field_types(cls), schema(cls).subcons, strict=True):
        size = sub.sizeof()
        if isinstance(kind, type):
            spans += _reserved_spans_named(kind, at, f"{prefix}{name}.")
        elif name.startswith(RESERVED) or name in ("unused4", "unused5"):
            spans.append(((at, at + size), prefix + name))
        at += size
    return spans


@SETTINGS
@given(PS.dirents(plus=False), PS.dirents(plus=True), PS.extensions())
def test_padding_bytes_are_zero(plain: list[Any], plus: list[Any], exts: tuple[Any, ...]) -> None:
    for entries, is_plus in ((plain, False), (plus, True)):
        raw = encode_dirents(entries, plus=is_plus)
        pos = 0
        fixed = 152 if is_plus else 24
        for e in entries:
            end = pos + fixed + len(e.name)
            padded = (end + 7) & ~7
            assert raw[end:padded] == bytes(padded - end)
            pos = padded
    raw = encode_extensions(exts)
    # Each record is 8-aligned and its tail after the content is zero: re-encoding what was
    # decoded gives the very same bytes.
    assert encode_extensions(decode_extensions(raw)) == raw


def test_truncated_compat_reply_drops_the_tail_not_zeroes_stale_data() -> None:
    attr = S.Attr(ino=1, mode=0o100644, blksize=4096, flags=1)
    raw = b"".join(encode_reply_parts(OPCODES[Opcode.GETATTR], 2, S.AttrOut(1, 0, 0, attr), 8))
    assert len(raw) == 16 + 96  # blksize and flags are not on the wire before 7.9


def test_error_reply_with_body_is_rejected() -> None:
    raw = struct.pack("<IiQ", 24, -2, 2) + bytes(8)
    with pytest.raises(ProtocolError):
        decode_reply(Opcode.GETATTR, raw)
