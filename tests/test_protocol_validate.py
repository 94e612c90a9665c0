"""The reply validator encodes SECURITY.md B5: each rule the kernel applies to a reply."""

from __future__ import annotations

import errno
import stat
import struct

import pytest

from virtiofs.errors import ProtocolError
from virtiofs.protocol import (
    DirEntry,
    InitFlags,
    Opcode,
    decode_request,
    encode_dirents,
    encode_error,
    encode_reply,
    encode_request,
    validate_reply,
)
from virtiofs.protocol import structs as S

REG = S.Attr(ino=5, size=3, mode=stat.S_IFREG | 0o644, nlink=1)
DIR = S.Attr(ino=6, mode=stat.S_IFDIR | 0o755, nlink=2)


def req(op: Opcode, arg: object = None, names: tuple[bytes, ...] = (), data: bytes = b"",
        unique: int = 10) -> object:
    return decode_request(encode_request(op, unique, 1, arg, names, data))


def header(length: int, error: int, unique: int) -> bytes:
    return struct.pack("<IiQ", length, error, unique)


GETATTR = req(Opcode.GETATTR, S.GetattrIn())
GOOD_ATTR = encode_reply(Opcode.GETATTR, 10, S.AttrOut(1, 0, 0, REG))


def test_good_reply_passes_and_is_decoded() -> None:
    assert validate_reply(GETATTR, GOOD_ATTR).value.attr == REG
    assert validate_reply(GETATTR, [GOOD_ATTR[:16], GOOD_ATTR[16:]]).value.attr == REG


@pytest.mark.parametrize("raw,why", [
    (b"\0" * 15, "shorter than out_header"),
    (header(200, 0, 10) + GOOD_ATTR[16:], "len != bytes written"),
    (header(16, 5, 10), "positive error"),
    (header(16, -512, 10), "errno <= -512"),
    (header(24, -2, 10) + bytes(8), "error with a body"),
    (header(16 + 104 + 8, 0, 10) + GOOD_ATTR[16:] + bytes(8), "body longer than expected"),
    (header(16 + 96, 0, 10) + GOOD_ATTR[16:112], "fixed reply shorter than its minor's size"),
    (GOOD_ATTR[:8] + struct.pack("<Q", 12) + GOOD_ATTR[16:], "unknown unique"),
    (GOOD_ATTR[:8] + struct.pack("<Q", 0) + GOOD_ATTR[16:], "unique 0 is a notification"),
])
def test_framing_rules(raw: bytes, why: str) -> None:
    with pytest.raises(ProtocolError):
        validate_reply(GETATTR, raw)


def test_error_replies_pass() -> None:
    assert validate_reply(GETATTR, encode_error(10, errno.ENOENT)).error == errno.ENOENT


def test_attr_with_invalid_type_or_size_fails() -> None:
    for attr in (REG._replace(mode=0o644), REG._replace(size=1 << 63)):
        with pytest.raises(ProtocolError):
            validate_reply(GETATTR, encode_reply(Opcode.GETATTR, 10, S.AttrOut(1, 0, 0, attr)))


def entry(nodeid: int, attr: S.Attr, generation: int = 0) -> S.EntryOut:
    return S.EntryOut(nodeid, generation, 1, 1, 0, 0, attr)


def test_lookup_rules() -> None:
    lookup = req(Opcode.LOOKUP, names=(b"x",))
    assert validate_reply(lookup, encode_reply(Opcode.LOOKUP, 10, entry(0, S.Attr())))  # negative
    assert validate_reply(lookup, encode_reply(Opcode.LOOKUP, 10, entry(5, REG, 3)))
    with pytest.raises(ProtocolError):  # root with a generation
        validate_reply(lookup, encode_reply(Opcode.LOOKUP, 10, entry(1, DIR, 3)))


@pytest.mark.parametrize("op,arg,names,reply", [
    (Opcode.MKDIR, S.MkdirIn(0o755), (b"d",), entry(7, REG)),
    (Opcode.MKDIR, S.MkdirIn(0o755), (b"d",), entry(1, DIR)),
    (Opcode.SYMLINK, None, (b"l", b"t"), entry(7, REG)),
    (Opcode.MKNOD, S.MknodIn(stat.S_IFIFO | 0o644, 0), (b"p",), entry(7, REG)),
    (Opcode.MKNOD, S.MknodIn(stat.S_IFREG | 0o644, 0), (b"p",), entry(0, REG)),
])
def test_new_entry_rules(op: Opcode, arg: object, names: tuple[bytes, ...],
                         reply: S.EntryOut) -> None:
    with pytest.raises(ProtocolError):
        validate_reply(req(op, arg, names), encode_reply(op, 10, reply))


def test_create_must_return_a_regular_file() -> None:
    create = req(Opcode.CREATE, S.CreateIn(0, stat.S_IFREG | 0o644), (b"f",))
    good = encode_reply(Opcode.CREATE, 10, (entry(7, REG), S.OpenOut(3)))
    assert validate_reply(create, good)
    with pytest.raises(ProtocolError):
        validate_reply(create, encode_reply(Opcode.CREATE, 10, (entry(7, DIR), S.OpenOut(3))))


def test_write_out_size_not_above_request() -> None:
    write = req(Opcode.WRITE, S.WriteIn(1, 0, 3), data=b"abc")
    assert validate_reply(write, encode_reply(Opcode.WRITE, 10, S.WriteOut(3)))
    with pytest.raises(ProtocolError):
        validate_reply(write, encode_reply(Opcode.WRITE, 10, S.WriteOut(4)))


def test_read_and_xattr_data_not_above_request() -> None:
    read = req(Opcode.READ, S.ReadIn(1, 0, 4))
    assert validate_reply(read, encode_reply(Opcode.READ, 10, b"abcd"))
    with pytest.raises(ProtocolError):
        validate_reply(read, encode_reply(Opcode.READ, 10, b"abcde"))
    getx = req(Opcode.GETXATTR, S.GetxattrIn(2), (b"user.a",))
    with pytest.raises(ProtocolError):
        validate_reply(getx, encode_reply(Opcode.GETXATTR, 10, b"abc"))
    size_query = req(Opcode.GETXATTR, S.GetxattrIn(0), (b"user.a",))
    assert validate_reply(size_query, encode_reply(Opcode.GETXATTR, 10, S.GetxattrOut(3)))


def test_listxattr_names_must_be_nul_terminated() -> None:
    listx = req(Opcode.LISTXATTR, S.GetxattrIn(64))
    assert validate_reply(listx, encode_reply(Opcode.LISTXATTR, 10, b"user.a\0user.b\0"))
    for bad in (b"user.a", b"\0user.a\0", b"user.a\0\0"):
        with pytest.raises(ProtocolError):
            validate_reply(listx, encode_reply(Opcode.LISTXATTR, 10, bad))


def test_readdir_names_and_trailing_record() -> None:
    readdir = req(Opcode.READDIR, S.ReadIn(1, 0, 4096))
    body = encode_dirents([DirEntry(5, 1, 8, b"file")])
    assert validate_reply(readdir, encode_reply(Opcode.READDIR, 10, body))
    for broken in (body[:-2],                                     # padding cut: entry lost
                   body[:16] + struct.pack("<I", 0) + body[20:],  # namelen 0
                   body[:24] + b"a/cd" + body[28:]):              # '/' in a name
        with pytest.raises(ProtocolError):
            validate_reply(readdir, encode_reply(Opcode.READDIR, 10, broken))


def test_no_reply_opcodes_and_interrupts() -> None:
    forget = req(Opcode.FORGET, S.ForgetIn(1))
    with pytest.raises(ProtocolError):
        validate_reply(forget, encode_error(10, errno.ENOSYS))
    interrupt = req(Opcode.INTERRUPT, S.InterruptIn(10), unique=11)
    assert validate_reply(interrupt, encode_error(11, errno.EAGAIN)).error == errno.EAGAIN
    with pytest.raises(ProtocolError):
        validate_reply(interrupt, encode_reply(Opcode.INTERRUPT, 11))


def test_init_reply_rules() -> None:
    init = req(Opcode.INIT, S.InitIn(7, 45, 1 << 17, int(InitFlags.INIT_EXT)))
    good = S.InitOut(7, 45, 1 << 17, int(InitFlags.MAP_ALIGNMENT), map_alignment=12)
    assert validate_reply(init, encode_reply(Opcode.INIT, 10, good))
    for bad in (good._replace(major=8), good._replace(map_alignment=22)):
        with pytest.raises(ProtocolError):
            validate_reply(init, encode_reply(Opcode.INIT, 10, bad))
    old = req(Opcode.INIT, S.InitIn(7, 22, 1 << 17))
    assert validate_reply(old, encode_reply(Opcode.INIT, 10, good, 22))  # 24 bytes for 7.22
    with pytest.raises(ProtocolError):
        validate_reply(old, encode_reply(Opcode.INIT, 10, good, 45))     # 64: too long


def test_copy_file_range_bounds() -> None:
    arg = S.CopyFileRangeIn(1, 0, 2, 3, 0, 100)
    cfr = req(Opcode.COPY_FILE_RANGE_64, arg)
    assert validate_reply(cfr, encode_reply(Opcode.COPY_FILE_RANGE_64, 10,
                                            S.CopyFileRangeOut(100)))
    with pytest.raises(ProtocolError):
        validate_reply(cfr, encode_reply(Opcode.COPY_FILE_RANGE_64, 10,
                                         S.CopyFileRangeOut(101)))
