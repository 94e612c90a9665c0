"""Fuzz FUSE request decoding: ``decode_request`` (fast and careful paths), ``decoder_for`` and the
session's decoder, differentially.

Input: one selector byte (negotiated minor, SETXATTR_EXT), then the request bytes.
Properties: only ``ProtocolError`` escapes; the fast path, the careful path and ``decoder_for``
(what ``Session`` decodes with) agree (same request or all refuse); a decoded request without
extensions re-encodes to the very bytes it came from (nothing dropped or invented).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Target, check, instrumented, main  # noqa: E402

with instrumented():
    from _seeds import golden_requests, valid_requests

    from virtiofs.errors import ProtocolError
    from virtiofs.protocol import encode_request
    from virtiofs.protocol.codec import _decode_generic, decode_request, decoder_for
    from virtiofs.protocol.constants import KERNEL_MINOR_VERSION, InitFlags, Opcode

# Minors the kernel (or an old one) may speak: each changes struct sizes somewhere.
MINORS = (KERNEL_MINOR_VERSION, 40, 36, 31, 25, 23, 18, 12, 9)
_SETXATTR_EXT = int(InitFlags.SETXATTR_EXT)
_DECODERS = {(m, f): decoder_for(m, f) for m in MINORS for f in (0, _SETXATTR_EXT)}


def _same(a: object, b: object) -> bool:
    """Request equality with memoryviews compared by content."""
    return tuple(bytes(x) if isinstance(x, memoryview) else x for x in a) == \
        tuple(bytes(x) if isinstance(x, memoryview) else x for x in b)  # type: ignore[attr-defined]


def one_input(data: bytes) -> None:
    if not data:
        return
    sel = data[0]
    minor = MINORS[sel % len(MINORS)]
    flags = _SETXATTR_EXT if sel & 0x80 else 0
    buf = data[1:]
    try:
        req = decode_request(buf, minor=minor, flags=flags)
    except ProtocolError:
        # The careful path is the one that raised (the fast path never raises): the
        # per-version decoder must refuse as well.
        try:
            _DECODERS[(minor, flags)](buf)
        except ProtocolError:
            pass
        else:
            check(False, "decoder_for accepts what decode_request refuses")
        raise
    generic = _decode_generic(buf, minor, flags)
    check(_same(req, generic), f"fast and careful decoders disagree: {req!r} vs {generic!r}")
    check(_same(_DECODERS[(minor, flags)](buf), req), "decoder_for disagrees with decode_request")
    length = req.header.len
    spec = req.spec
    if not req.header.total_extlen and spec.opcode is not Opcode.INIT \
            and minor == KERNEL_MINOR_VERSION:
        h = req.header
        again = encode_request(spec.opcode, h.unique, h.nodeid, req.arg, req.names,
                               bytes(req.data), req.items, uid=h.uid, gid=h.gid, pid=h.pid,
                               minor=minor, flags=flags)
        # The reserved padding of in_header is not a field encode_request takes.
        check(again[:38] == bytes(buf[:38]) and again[40:] == bytes(buf[40:length]),
              "decode/encode round trip changed the request")


def seeds() -> list[bytes]:
    out = [bytes([0]) + raw for _, raw in valid_requests()]
    out += [bytes([0]) + raw for raw in golden_requests()]
    return out


TARGET = Target("request", one_input, seeds, allowed=(ProtocolError,), max_len=8192)

if __name__ == "__main__":
    main(TARGET)
