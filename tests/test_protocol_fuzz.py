"""Decoders on hostile bytes: a message or ``ProtocolError``, never anything else (h11's rule).

Inputs: random bytes, the strategies' malformed messages (truncated, wrong len, bad names,
size mismatches, mutations), and every prefix of valid messages fed byte at a time.  The fast
path and the careful path of ``decode_request`` must also agree on every one of them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtiofs.errors import ProtocolError
from virtiofs.protocol import (
    OPCODES,
    Opcode,
    decode_dirents,
    decode_notify,
    decode_reply,
    decode_request,
)
from virtiofs.protocol import strategies as PS
from virtiofs.protocol.extensions import decode_extensions

CODEC = sys.modules["virtiofs.protocol.codec"]
EXAMPLES = int(os.environ.get("VIRTIOFS_FUZZ_EXAMPLES", "100"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])
MINORS = st.sampled_from([45, 36, 23, 12, 11, 8])
FLAGS = st.sampled_from([0, 1 << 29])


def outcome(fn: Callable[[], Any]) -> Any:
    """The decoded value, or the ProtocolError's (field, errno): anything else propagates."""
    try:
        return fn()
    except ProtocolError as exc:
        assert isinstance(exc.errno, int) and exc.errno > 0
        return ("error", exc.errno)


def check_request(buf: bytes, minor: int, flags: int) -> None:
    fast = outcome(lambda: decode_request(buf, minor=minor, flags=flags))
    careful = outcome(lambda: CODEC._decode_generic(buf, minor, flags))
    assert fast == careful
    assert outcome(lambda: decode_request(memoryview(buf), minor=minor, flags=flags)) == fast


@SETTINGS
@given(st.one_of(PS.request_bytes(malformed=True), st.binary(max_size=256)), MINORS, FLAGS)
def test_request_decoder_only_raises_protocol_error(buf: bytes, minor: int, flags: int) -> None:
    check_request(buf, minor, flags)


@SETTINGS
@given(PS.requests(), MINORS)
def test_request_prefixes_byte_at_a_time(example: Any, minor: int) -> None:
    raw = example.encode()
    for end in range(len(raw) + 1):
        check_request(raw[:end], minor, example.flags)


@SETTINGS
@given(PS.reply_bytes(malformed=True), st.sampled_from(list(OPCODES)))
def test_reply_decoder_only_raises_protocol_error(pair: Any, other: Opcode) -> None:
    request, buf = pair
    xattr = getattr(request.arg, "size", None)
    for opcode in (request.opcode, other):
        outcome(lambda op=opcode: decode_reply(op, buf, xattr_size=xattr))
    for end in range(0, len(buf) + 1, max(1, len(buf) // 16)):
        outcome(lambda end=end: decode_reply(request.opcode, buf[:end], xattr_size=xattr))


@SETTINGS
@given(st.one_of(PS.notify_bytes(malformed=True), st.binary(max_size=128)))
def test_notify_decoder_only_raises_protocol_error(buf: bytes) -> None:
    for end in range(len(buf) + 1):
        outcome(lambda end=end: decode_notify(buf[:end]))


@pytest.mark.parametrize("plus", [False, True], ids=["dirent", "direntplus"])
@SETTINGS
@given(data=st.data())
def test_dirent_decoder_only_raises_protocol_error(plus: bool, data: st.DataObject) -> None:
    buf = data.draw(st.one_of(PS.dirent_bytes(plus, malformed=True), st.binary(max_size=400)))
    for strict in (False, True):
        outcome(lambda strict=strict: decode_dirents(buf, plus, strict=strict))
    for end in range(0, len(buf) + 1, 8):
        outcome(lambda end=end: decode_dirents(buf[:end], plus))


@SETTINGS
@given(st.one_of(PS.extension_bytes(malformed=True), st.binary(max_size=128)))
def test_extension_decoder_only_raises_protocol_error(buf: bytes) -> None:
    for end in range(len(buf) + 1):
        outcome(lambda end=end: decode_extensions(buf[:end]))


def test_unknown_opcode_answers_enosys() -> None:
    raw = bytes([40, 0, 0, 0, 7, 0, 0, 0]) + bytes(32)  # opcode 7 was never assigned
    with pytest.raises(ProtocolError) as info:
        decode_request(raw)
    assert info.value.errno == 38 and info.value.field == "opcode"


def test_trailing_bytes_after_the_arguments_are_refused() -> None:
    good = PS.RequestExample(Opcode.LOOKUP, 2, 1, None, (b"name",)).encode()
    bad = (len(good) + 3).to_bytes(4, "little") + good[4:] + b"xyz"
    with pytest.raises(ProtocolError) as info:
        decode_request(bad)
    assert info.value.field == "len"
