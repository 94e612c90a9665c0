"""Seed inputs: one valid request (and reply) per opcode from ``encode_request``/``encode_reply``,
plus the golden vectors under ``tests/vectors/`` when they exist.

Import this inside ``with instrumented():`` (it imports ``virtiofs``).
"""

from __future__ import annotations

import glob
import json
import os
import stat
import struct
from collections.abc import Iterator
from typing import Any

from virtiofs.protocol import OPCODES, encode_request
from virtiofs.protocol import structs as S
from virtiofs.protocol.codec import encode_reply
from virtiofs.protocol.constants import KERNEL_MINOR_VERSION, Opcode
from virtiofs.protocol.dirents import DirEntry, encode_dirents
from virtiofs.protocol.extensions import SecurityContext, SupplementaryGroups, encode_extensions
from virtiofs.protocol.schema import codec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(ROOT, "tests", "vectors")


def zero(cls: type[Any], **fields: Any) -> Any:
    """A struct with every field zero except ``fields``."""
    c = codec(cls)
    return c.unpack(bytes(c.size))._replace(**fields)


def init_in(minor: int = KERNEL_MINOR_VERSION, flags: int = 0xFFFFFFFF,
            flags2: int = 0xFFFFFFFF) -> Any:
    """The INIT arguments a current kernel sends (every flag offered)."""
    return zero(S.InitIn, major=7, minor=minor, max_readahead=1 << 17, flags=flags,
                flags2=flags2)


def request_args(op: Opcode, nodeid: int = 1, fh: int = 1) -> tuple[Any, tuple[bytes, ...],
                                                                      bytes, tuple[Any, ...]]:
    """(arg, names, data, items) of a plausible request of ``op``."""
    spec = OPCODES[op]
    names: tuple[bytes, ...] = tuple([b"file", b"target"][:spec.names])
    data = b""
    items: tuple[Any, ...] = ()
    arg: Any = None
    if spec.request is not None:
        arg = zero(spec.request)
        fields = spec.request._fields
        kw: dict[str, Any] = {}
        if "fh" in fields:
            kw["fh"] = fh
        if "size" in fields:
            kw["size"] = 4096
        if "mode" in fields:
            kw["mode"] = (stat.S_IFREG if op in (Opcode.MKNOD, Opcode.CREATE, Opcode.TMPFILE)
                          else 0) | 0o644
        if op is Opcode.INIT:
            arg = init_in()
            kw = {}
        elif op in (Opcode.FORGET,):
            kw = {"nlookup": 1}
        elif op in (Opcode.BATCH_FORGET, Opcode.REMOVEMAPPING):
            item_cls = spec.items
            assert item_cls is not None
            items = (zero(item_cls, **({"nodeid": 2, "nlookup": 1} if op is Opcode.BATCH_FORGET
                                      else {"len": 4096})),)
            kw = {"count": 1}
        elif op is Opcode.WRITE:
            data = b"hello fuzz"
            kw["size"] = len(data)
        elif op is Opcode.SETXATTR:
            names = (b"user.fuzz",)
            data = b"value"
            kw["size"] = len(data)
        elif op in (Opcode.GETXATTR,):
            names = (b"user.fuzz",)
        elif op in (Opcode.RENAME, Opcode.RENAME2, Opcode.LINK):
            kw["newdir" if op is not Opcode.LINK else "oldnodeid"] = 1
        elif op is Opcode.IOCTL:
            kw.update(in_size=0, out_size=0)
        elif op is Opcode.NOTIFY_REPLY:
            kw["size"] = 0
        elif op is Opcode.LSEEK:
            kw["whence"] = 0
        elif op is Opcode.SETATTR:
            kw.update(valid=1, mode=0o600)
        arg = arg._replace(**{k: v for k, v in kw.items() if k in arg._fields})
        if op is Opcode.REMOVEXATTR:
            names = (b"user.fuzz",)
    if op is Opcode.REMOVEXATTR:
        names = (b"user.fuzz",)
    return arg, names, data, items


def valid_requests(nodeid: int = 1, fh: int = 1) -> Iterator[tuple[Opcode, bytes]]:
    """One encoded request per opcode (plus some with extensions) at the kernel's minor."""
    for unique, op in enumerate(OPCODES, start=2):
        try:
            arg, names, data, items = request_args(op, nodeid, fh)
            yield op, encode_request(op, unique * 2, nodeid, arg, names, data, items,
                                     uid=0, gid=0, pid=1)
        except Exception:  # pragma: no cover - an opcode our defaults cannot build
            continue
    # Extensions (security context + supplementary groups) on creating opcodes.
    ext = (SecurityContext(((b"security.selinux", b"system_u:object_r:tmp_t:s0\0"),)),
           SupplementaryGroups((1000,)))
    for op in (Opcode.CREATE, Opcode.MKDIR, Opcode.MKNOD, Opcode.SYMLINK):
        arg, names, data, items = request_args(op, nodeid, fh)
        try:
            yield op, encode_request(op, 999, nodeid, arg, names, data, items, ext=ext)
        except Exception:  # pragma: no cover
            continue


def valid_replies() -> Iterator[tuple[Opcode, bytes]]:
    """A valid reply per opcode with a body we can build from zeroed structs."""
    attr = zero(S.Attr, ino=2, mode=stat.S_IFREG | 0o644, nlink=1, size=5)
    entry = zero(S.EntryOut, nodeid=2, attr=attr)
    for op, spec in OPCODES.items():
        if spec.no_reply:
            continue
        parts: list[Any] = []
        from virtiofs.protocol.opcodes import DATA, XATTR
        ok = True
        for part in spec.reply:
            if part is DATA:
                parts.append(b"data")
            elif part is XATTR:
                parts.append(b"value")
            elif part is S.EntryOut:
                parts.append(entry)
            elif isinstance(part, type):
                try:
                    value = zero(part)
                    if "attr" in part._fields:
                        value = value._replace(attr=attr)
                    if op is Opcode.INIT:
                        value = value._replace(major=7, minor=KERNEL_MINOR_VERSION)
                    parts.append(value)
                except Exception:
                    ok = False
            else:  # pragma: no cover
                ok = False
        if not ok:
            continue
        result = None if not parts else parts[0] if len(parts) == 1 else tuple(parts)
        try:
            yield op, encode_reply(op, 7, result)
        except Exception:  # pragma: no cover
            continue
    yield Opcode.READDIR, encode_reply(Opcode.READDIR, 7, encode_dirents(
        [DirEntry(2, 1, 8, b"a"), DirEntry(3, 2, 4, b"dir")]))


def dirent_seeds() -> Iterator[bytes]:
    attr = zero(S.Attr, ino=2, mode=stat.S_IFREG | 0o644, nlink=1)
    entries = [DirEntry(2, 1, 8, b"a"), DirEntry(3, 2, 4, b"subdir"), DirEntry(4, 3, 10, b"l" * 40)]
    yield encode_dirents(entries)
    yield encode_dirents([e._replace(entry=zero(S.EntryOut, nodeid=e.ino, attr=attr))
                          for e in entries], plus=True)


def extension_seeds() -> Iterator[bytes]:
    yield encode_extensions((SecurityContext(((b"security.selinux", b"label\0"),)),))
    yield encode_extensions((SupplementaryGroups((1, 2, 3)),))
    yield encode_extensions((SecurityContext(((b"a", b"b"), (b"c", b""))),
                             SupplementaryGroups(())))


def golden_vectors() -> Iterator[bytes]:
    """Raw byte strings from ``tests/vectors`` (``*.bin`` files; hex strings inside ``*.json``
    files under keys that mention request/reply/bytes/hex/raw)."""
    if not os.path.isdir(VECTORS):
        return
    for path in sorted(glob.glob(os.path.join(VECTORS, "**", "*"), recursive=True)):
        if path.endswith(".bin"):
            with open(path, "rb") as f:
                yield f.read()
        elif path.endswith(".json"):
            try:
                with open(path) as f:
                    doc = json.load(f)
            except (OSError, ValueError):
                continue
            yield from _hex_strings(doc, "")


def _hex_strings(doc: Any, key: str) -> Iterator[bytes]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _hex_strings(v, str(k).lower())
    elif isinstance(doc, list):
        for v in doc:
            yield from _hex_strings(v, key)
    elif isinstance(doc, str) and any(w in key for w in ("request", "reply", "bytes", "hex",
                                                         "raw", "wire")):
        try:
            yield bytes.fromhex(doc.replace(" ", "").replace(":", ""))
        except ValueError:
            return


def golden_requests() -> Iterator[bytes]:
    """Golden vectors that look like requests (in_header.len == size, known opcode)."""
    for raw in golden_vectors():
        if len(raw) >= 40:
            length, opcode = struct.unpack_from("<II", raw)
            if length == len(raw) and opcode in {int(o) for o in OPCODES}:
                yield raw


def golden_replies() -> Iterator[bytes]:
    """Golden vectors that look like replies (out_header.len == size, errno <= 0)."""
    for raw in golden_vectors():
        if len(raw) >= 16:
            length, error = struct.unpack_from("<Ii", raw)
            if length == len(raw) and -512 < error <= 0:
                yield raw

