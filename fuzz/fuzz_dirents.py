"""Fuzz READDIR/READDIRPLUS body parsing (``decode_dirents``, as fs/fuse/readdir.c parses it).

Input: a flag byte (plus, strict), then the body.  Properties: only ``ProtocolError``; every
entry has a name of 1..1024 bytes without '/' or NUL; re-encoding the entries and parsing that
again gives the same entries (the encoder and the parser agree on the layout); the encoding is
never longer than the body it came from.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Target, check, instrumented, main  # noqa: E402

with instrumented():
    from _seeds import dirent_seeds

    from virtiofs.errors import ProtocolError
    from virtiofs.protocol.dirents import decode_dirents, encode_dirents


def one_input(data: bytes) -> None:
    if not data:
        return
    plus = bool(data[0] & 1)
    strict = bool(data[0] & 2)
    body = data[1:]
    entries = decode_dirents(body, plus, strict=strict)
    for e in entries:
        check(0 < len(e.name) <= 1024 and b"/" not in e.name and b"\0" not in e.name,
              f"dirent name {e.name[:20]!r} accepted")
    again = encode_dirents(entries, plus=plus)
    check(len(again) <= len(body), "re-encoded dirents are longer than the body")
    check(decode_dirents(again, plus, strict=True) == entries, "dirent round trip differs")


def seeds() -> list[bytes]:
    plain, plus = list(dirent_seeds())[:2]
    return [b"\0" + plain, b"\2" + plain, b"\1" + plus, b"\3" + plus]


TARGET = Target("dirents", one_input, seeds, allowed=(ProtocolError,))

if __name__ == "__main__":
    main(TARGET)
