"""Fuzz FUSE reply decoding (the client's side) and the reply validator (SECURITY.md B5).

Input: a selector byte (opcode row), a flag byte (xattr size given, minor, unique matching),
then the reply bytes.  Properties: ``decode_reply`` and ``validate_reply`` raise only
``ProtocolError``; a decoded reply re-encodes to the same bytes (``encode_reply``/
``encode_error``); a reply ``validate_reply`` accepts has ``len`` == its size, the request's
``unique`` and an errno in (-512, 0].
"""

from __future__ import annotations

import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Target, check, instrumented, main  # noqa: E402

with instrumented():
    from _seeds import golden_replies, valid_replies, valid_requests

    from virtiofs.errors import ProtocolError
    from virtiofs.protocol import OPCODES
    from virtiofs.protocol.codec import decode_reply, decode_request, encode_error, encode_reply
    from virtiofs.protocol.constants import KERNEL_MINOR_VERSION, Opcode
    from virtiofs.protocol.validate import validate_reply

REPLIED = [op for op, spec in OPCODES.items() if not spec.no_reply]
INDEX = {op: i for i, op in enumerate(REPLIED)}
MINORS = (KERNEL_MINOR_VERSION, 36, 31, 23, 12, 9)
REQUESTS = {}
for _op, _raw in valid_requests():
    if _op not in REQUESTS:
        REQUESTS[_op] = _raw


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    op = REPLIED[data[0] % len(REPLIED)]
    flags = data[1]
    minor = MINORS[(flags >> 2) % len(MINORS)]
    buf = data[2:]
    xattr_size = 64 if flags & 1 else 0
    reply = decode_reply(op, buf, minor=minor, xattr_size=xattr_size)
    h = reply.header
    if h.error:
        check(bytes(buf) == encode_error(h.unique, -h.error), "error reply does not re-encode")
    elif op not in (Opcode.INIT, Opcode.CUSE_INIT):
        result = reply.value
        again = encode_reply(op, h.unique, result, minor)
        check(again == bytes(buf), f"{op.name} reply does not re-encode identically")
    raw_req = REQUESTS.get(op)
    if raw_req is None:
        return
    # The request the reply answers: same unique when asked, so the content checks run.
    if flags & 2 and len(buf) >= 16:
        unique = struct.unpack_from("<Q", buf, 8)[0]
        raw_req = raw_req[:8] + struct.pack("<Q", unique) + raw_req[16:]
    if op in (Opcode.GETXATTR, Opcode.LISTXATTR):
        # fuse_getxattr_in.size sits right after the in_header.
        raw_req = raw_req[:40] + struct.pack("<I", xattr_size) + raw_req[44:]
    request = decode_request(raw_req)
    ok = validate_reply(request, buf, minor=minor)
    check(ok.header.len == len(buf) and ok.header.unique == request.unique
          and -512 < ok.header.error <= 0, "validate_reply accepted a badly framed reply")


def seeds() -> list[bytes]:
    out = []
    for op, raw in valid_replies():
        if op in INDEX:
            out.append(bytes([INDEX[op], 2]) + raw)
            out.append(bytes([INDEX[op], 3]) + raw)
    for raw in golden_replies():
        out.append(bytes([0, 0]) + raw)
    return out


TARGET = Target("reply", one_input, seeds, allowed=(ProtocolError,), max_len=8192)

if __name__ == "__main__":
    main(TARGET)
