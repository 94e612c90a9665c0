"""Fuzz notification parsing (``decode_notify``) and request-extension parsing
(``decode_extensions``: security contexts, supplementary groups; libfuse 5d2bf19e was an OOB
read there).

Input: a selector byte (0: notification, 1: extension area), then the bytes.  Properties: only
``ProtocolError``; a parsed notification re-encodes to the same bytes; parsed extensions
re-encode to something that parses to the same extensions.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Target, check, instrumented, main  # noqa: E402

with instrumented():
    from _seeds import extension_seeds, zero

    from virtiofs.errors import ProtocolError
    from virtiofs.protocol import structs as S
    from virtiofs.protocol.constants import NotifyCode
    from virtiofs.protocol.extensions import decode_extensions, encode_extensions
    from virtiofs.protocol.notify import decode_notify, encode_notify


def one_input(data: bytes) -> None:
    if not data:
        return
    body = data[1:]
    if data[0] & 1:
        exts = decode_extensions(body)
        again = encode_extensions(exts)
        check(decode_extensions(again) == exts, "extension round trip differs")
        return
    n = decode_notify(body)
    again = encode_notify(n.code, n.arg, n.name, n.data, tuple(n.nodeids))
    check(again == bytes(body), f"{n.code.name} notification does not re-encode identically")


def seeds() -> list[bytes]:
    out = [b"\1" + e for e in extension_seeds()]
    notes = [
        encode_notify(NotifyCode.INVAL_INODE, zero(S.NotifyInvalInodeOut, ino=2, len=10)),
        encode_notify(NotifyCode.INVAL_ENTRY, zero(S.NotifyInvalEntryOut, parent=1, namelen=3),
                      name=b"abc"),
        encode_notify(NotifyCode.DELETE, zero(S.NotifyDeleteOut, parent=1, child=2, namelen=1),
                      name=b"x"),
        encode_notify(NotifyCode.STORE, zero(S.NotifyStoreOut, nodeid=2, size=4), data=b"data"),
        encode_notify(NotifyCode.RETRIEVE, zero(S.NotifyRetrieveOut, nodeid=2, size=4)),
        encode_notify(NotifyCode.POLL, zero(S.NotifyPollWakeupOut, kh=1)),
        encode_notify(NotifyCode.PRUNE, zero(S.NotifyPruneOut, count=2), nodeids=(2, 3)),
        encode_notify(NotifyCode.RESEND),
    ]
    out += [b"\0" + n for n in notes]
    return out


TARGET = Target("notify", one_input, seeds, allowed=(ProtocolError,))

if __name__ == "__main__":
    main(TARGET)
