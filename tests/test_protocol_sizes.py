"""Struct sizes, field layouts, numbers and compat sizes against uapi fuse.h 7.45.

The expected numbers are written out here from the header (sizes measured by compiling it on
x86-64, SPEC.md 1.3), not read back from the code under test.
"""

from __future__ import annotations

import stat
import struct

import pytest

from virtiofs.errors import LocalProtocolError, ProtocolError
from virtiofs.protocol import (
    BY_NUMBER,
    OPCODES,
    InitFlags,
    NotifyCode,
    Opcode,
    constants,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    reply_struct_size,
    schema,
    sizeof,
)
from virtiofs.protocol import structs as S
from virtiofs.protocol.codec import init_in_size

FUSE_H_SIZES = {
    "InHeader": 40, "OutHeader": 16, "Attr": 88, "SxTime": 16, "Statx": 256, "Kstatfs": 80,
    "FileLock": 24, "EntryOut": 128, "ForgetIn": 8, "ForgetOne": 16, "BatchForgetIn": 8,
    "GetattrIn": 16, "AttrOut": 104, "StatxIn": 24, "StatxOut": 288, "MknodIn": 16,
    "MkdirIn": 8, "RenameIn": 8, "Rename2In": 16, "LinkIn": 8, "SetattrIn": 88, "OpenIn": 8,
    "CreateIn": 16, "OpenOut": 16, "ReleaseIn": 24, "FlushIn": 24, "ReadIn": 40, "WriteIn": 40,
    "WriteOut": 8, "StatfsOut": 80, "FsyncIn": 16, "SetxattrIn": 16, "GetxattrIn": 8,
    "GetxattrOut": 8, "LkIn": 48, "LkOut": 24, "AccessIn": 8, "InitIn": 64, "InitOut": 64,
    "CuseInitIn": 16, "CuseInitOut": 72, "InterruptIn": 8, "BmapIn": 16, "BmapOut": 8,
    "IoctlIn": 32, "IoctlIovec": 16, "IoctlOut": 16, "PollIn": 24, "PollOut": 8,
    "NotifyPollWakeupOut": 8, "FallocateIn": 32, "Dirent": 24, "DirentPlus": 152,
    "NotifyInvalInodeOut": 24, "NotifyInvalEntryOut": 16, "NotifyDeleteOut": 24,
    "NotifyStoreOut": 24, "NotifyRetrieveOut": 32, "NotifyRetrieveIn": 40, "NotifyPruneOut": 16,
    "BackingMap": 16, "LseekIn": 24, "LseekOut": 8, "CopyFileRangeIn": 56,
    "CopyFileRangeOut": 8, "SetupMappingIn": 40, "RemoveMappingIn": 4, "RemoveMappingOne": 16,
    "SyncfsIn": 8, "SecctxHeader": 8, "Secctx": 8, "ExtHeader": 8, "SuppGroups": 4,
    "UringEntInOut": 32, "UringReqHeader": 288, "UringCmdReq": 24,
}


@pytest.mark.parametrize("name,size", sorted(FUSE_H_SIZES.items()))
def test_struct_size_matches_fuse_h(name: str, size: int) -> None:
    cls = getattr(S, name)
    assert sizeof(cls) == size
    assert schema(cls).sizeof() == size  # the construct oracle agrees with the fast path


def test_every_declared_struct_is_checked() -> None:
    declared = {n for n, v in vars(S).items() if isinstance(v, type) and hasattr(v, "_fields")
                and not n.startswith("_")
                and v.__module__ == S.__name__}
    assert declared == set(FUSE_H_SIZES)


# Field offsets the SPEC states explicitly (fuse_init_out, 1.4) and a few easy to get wrong.
@pytest.mark.parametrize("cls,field,offset", [
    (S.InitOut, "max_background", 16), (S.InitOut, "max_write", 20),
    (S.InitOut, "time_gran", 24), (S.InitOut, "max_pages", 28),
    (S.InitOut, "map_alignment", 30), (S.InitOut, "flags2", 32),
    (S.InitOut, "max_stack_depth", 36), (S.InitOut, "request_timeout", 40),
    (S.InitIn, "flags2", 16), (S.InHeader, "total_extlen", 36), (S.OpenOut, "backing_id", 12),
    (S.EntryOut, "attr", 40), (S.AttrOut, "attr", 16), (S.StatxOut, "stat", 32),
    (S.Statx, "mode", 28), (S.Statx, "atime", 64), (S.Statx, "rdev_major", 128),
    (S.LkIn, "lk", 16), (S.LkIn, "lk_flags", 40), (S.SetattrIn, "atimensec", 56),
    (S.SetattrIn, "uid", 76), (S.ReadIn, "lock_owner", 24), (S.ReadIn, "flags", 32),
    (S.CopyFileRangeIn, "flags", 48), (S.SetupMappingIn, "moffset", 32),
    (S.IoctlIn, "in_size", 24), (S.NotifyRetrieveIn, "size", 16),
])
def test_field_offset(cls: type, field: str, offset: int) -> None:
    con = schema(cls)
    at = 0
    for sub in con.subcons:
        if sub.name == field:
            break
        at += sub.sizeof()
    else:  # pragma: no cover
        pytest.fail(f"{cls.__name__} has no {field}")
    assert at == offset


def test_signed_fields_are_the_signed_ones_of_fuse_h() -> None:
    # int32_t error; int32_t result; int32_t backing_id; int32_t fd; int64_t off/len (inval
    # inode); int64_t tv_sec; int32_t __reserved.  Everything else is unsigned.
    signed = set()
    for cls in (getattr(S, n) for n in FUSE_H_SIZES):
        for sub in schema(cls).subcons:
            fmt = getattr(sub.subcon, "fmtstr", "")
            if fmt and fmt[-1] in "bhilq":
                signed.add(f"{cls.__name__}.{sub.name}")
    assert signed == {"OutHeader.error", "IoctlOut.result", "OpenOut.backing_id",
                      "BackingMap.fd", "NotifyInvalInodeOut.off", "NotifyInvalInodeOut.len",
                      "SxTime.tv_sec", "SxTime.reserved"}


OPCODE_NUMBERS = {
    "LOOKUP": 1, "FORGET": 2, "GETATTR": 3, "SETATTR": 4, "READLINK": 5, "SYMLINK": 6,
    "MKNOD": 8, "MKDIR": 9, "UNLINK": 10, "RMDIR": 11, "RENAME": 12, "LINK": 13, "OPEN": 14,
    "READ": 15, "WRITE": 16, "STATFS": 17, "RELEASE": 18, "FSYNC": 20, "SETXATTR": 21,
    "GETXATTR": 22, "LISTXATTR": 23, "REMOVEXATTR": 24, "FLUSH": 25, "INIT": 26, "OPENDIR": 27,
    "READDIR": 28, "RELEASEDIR": 29, "FSYNCDIR": 30, "GETLK": 31, "SETLK": 32, "SETLKW": 33,
    "ACCESS": 34, "CREATE": 35, "INTERRUPT": 36, "BMAP": 37, "DESTROY": 38, "IOCTL": 39,
    "POLL": 40, "NOTIFY_REPLY": 41, "BATCH_FORGET": 42, "FALLOCATE": 43, "READDIRPLUS": 44,
    "RENAME2": 45, "LSEEK": 46, "COPY_FILE_RANGE": 47, "SETUPMAPPING": 48,
    "REMOVEMAPPING": 49, "SYNCFS": 50, "TMPFILE": 51, "STATX": 52, "COPY_FILE_RANGE_64": 53,
    "CUSE_INIT": 4096,
}


def test_opcode_numbers_and_table_cover_fuse_h() -> None:
    assert {op.name: int(op) for op in OPCODES} == OPCODE_NUMBERS
    assert set(BY_NUMBER) == set(OPCODE_NUMBERS.values())
    assert Opcode.CUSE_INIT_BSWAP_RESERVED == 4096 << 8
    assert Opcode.INIT_BSWAP_RESERVED == 26 << 24


def test_no_reply_opcodes() -> None:
    assert {op.name for op, s in OPCODES.items() if s.no_reply} == {
        "FORGET", "BATCH_FORGET", "NOTIFY_REPLY", "INTERRUPT"}


def test_notify_codes() -> None:
    assert [(c.name, int(c)) for c in NotifyCode] == [
        ("POLL", 1), ("INVAL_INODE", 2), ("INVAL_ENTRY", 3), ("STORE", 4), ("RETRIEVE", 5),
        ("DELETE", 6), ("RESEND", 7), ("INC_EPOCH", 8), ("PRUNE", 9)]


INIT_BITS = [
    "ASYNC_READ", "POSIX_LOCKS", "FILE_OPS", "ATOMIC_O_TRUNC", "EXPORT_SUPPORT", "BIG_WRITES",
    "DONT_MASK", "SPLICE_WRITE", "SPLICE_MOVE", "SPLICE_READ", "FLOCK_LOCKS", "HAS_IOCTL_DIR",
    "AUTO_INVAL_DATA", "DO_READDIRPLUS", "READDIRPLUS_AUTO", "ASYNC_DIO", "WRITEBACK_CACHE",
    "NO_OPEN_SUPPORT", "PARALLEL_DIROPS", "HANDLE_KILLPRIV", "POSIX_ACL", "ABORT_ERROR",
    "MAX_PAGES", "CACHE_SYMLINKS", "NO_OPENDIR_SUPPORT", "EXPLICIT_INVAL_DATA", "MAP_ALIGNMENT",
    "SUBMOUNTS", "HANDLE_KILLPRIV_V2", "SETXATTR_EXT", "INIT_EXT", "INIT_RESERVED",
    "SECURITY_CTX", "HAS_INODE_DAX", "CREATE_SUPP_GROUP", "HAS_EXPIRE_ONLY",
    "DIRECT_IO_ALLOW_MMAP", "PASSTHROUGH", "NO_EXPORT_SUPPORT", "HAS_RESEND", "ALLOW_IDMAP",
    "OVER_IO_URING", "REQUEST_TIMEOUT",
]


def test_init_flag_bits() -> None:
    assert [(f.name, f.value) for f in InitFlags] == [
        (name, 1 << bit) for bit, name in enumerate(INIT_BITS)]


def test_compat_sizes() -> None:
    assert (constants.COMPAT_ENTRY_OUT_SIZE, constants.COMPAT_ATTR_OUT_SIZE,
            constants.COMPAT_MKNOD_IN_SIZE, constants.COMPAT_WRITE_IN_SIZE,
            constants.COMPAT_STATFS_SIZE, constants.COMPAT_SETXATTR_IN_SIZE,
            constants.COMPAT_INIT_OUT_SIZE, constants.COMPAT_22_INIT_OUT_SIZE) == (
                120, 96, 8, 24, 48, 8, 8, 24)


@pytest.mark.parametrize("minor,size", [(0, 8), (4, 8), (5, 24), (22, 24), (23, 64), (45, 64)])
def test_init_reply_size_per_minor(minor: int, size: int) -> None:
    out = S.InitOut(7, minor, 1 << 20, 0, 12, 9, 1 << 17)
    raw = encode_reply(Opcode.INIT, 2, out, minor)
    assert len(raw) == 16 + size == struct.unpack_from("<I", raw)[0]
    assert reply_struct_size(S.InitOut, minor) == size
    back = decode_reply(Opcode.INIT, raw, minor=minor).value
    assert back.major == 7 and back.minor == minor
    with pytest.raises(ProtocolError):  # one byte more than that minor's size
        decode_reply(Opcode.INIT, raw[:0] + struct.pack("<I", len(raw) + 1) + raw[4:] + b"\0",
                     minor=minor)


@pytest.mark.parametrize("major,minor,size", [(7, 5, 8), (7, 6, 16), (7, 35, 16), (7, 36, 64),
                                              (7, 45, 64), (6, 40, 8)])
def test_init_request_is_sized_by_its_own_version(major: int, minor: int, size: int) -> None:
    assert init_in_size(major, minor) == size
    raw = encode_request(Opcode.INIT, 2, 0, S.InitIn(major, minor, 4096, 3))
    assert len(raw) == 40 + size
    req = decode_request(raw)  # the session decodes INIT before it knows any minor
    assert (req.arg.major, req.arg.minor) == (major, minor)


@pytest.mark.parametrize("op,minor,size", [
    (Opcode.GETATTR, 8, 0), (Opcode.GETATTR, 9, 16), (Opcode.READ, 8, 24),
    (Opcode.WRITE, 8, 24), (Opcode.WRITE, 9, 40), (Opcode.MKNOD, 11, 8), (Opcode.MKNOD, 12, 16),
    (Opcode.CREATE, 11, 8), (Opcode.CREATE, 12, 16), (Opcode.SETXATTR, 45, 8)])
def test_request_compat_sizes(op: Opcode, minor: int, size: int) -> None:
    assert OPCODES[op].request_size(minor) == size


def test_setxattr_ext_size() -> None:
    assert OPCODES[Opcode.SETXATTR].request_size(45, InitFlags.SETXATTR_EXT) == 16
    arg = S.SetxattrIn(3, 0, 1)
    raw = encode_request(Opcode.SETXATTR, 2, 5, arg, [b"user.x"], b"abc",
                         flags=int(InitFlags.SETXATTR_EXT))
    assert len(raw) == 40 + 16 + 7 + 3
    req = decode_request(raw, flags=int(InitFlags.SETXATTR_EXT))
    assert req.arg == arg and req.names == (b"user.x",) and bytes(req.data) == b"abc"
    plain = encode_request(Opcode.SETXATTR, 2, 5, arg._replace(setxattr_flags=0), [b"user.x"],
                           b"abc")
    assert len(plain) == 40 + 8 + 7 + 3


@pytest.mark.parametrize("minor,entry,attr,statfs", [(3, 120, 96, 48), (8, 120, 96, 80),
                                                     (9, 128, 104, 80)])
def test_reply_compat_sizes(minor: int, entry: int, attr: int, statfs: int) -> None:
    assert reply_struct_size(S.EntryOut, minor) == entry
    assert reply_struct_size(S.AttrOut, minor) == attr
    assert reply_struct_size(S.StatfsOut, minor) == statfs
    a = S.Attr(ino=1, mode=stat.S_IFREG | 0o644)
    raw = encode_reply(Opcode.LOOKUP, 4, S.EntryOut(2, 0, 1, 1, 0, 0, a), minor)
    assert len(raw) == 16 + entry
    assert decode_reply(Opcode.LOOKUP, raw, minor=minor).value.attr.mode == a.mode


def test_out_of_range_values_are_our_callers_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_reply(Opcode.WRITE, 2, S.WriteOut(1 << 32))
    with pytest.raises(LocalProtocolError):
        encode_reply(Opcode.WRITE, -1, S.WriteOut(1))
    with pytest.raises(LocalProtocolError):
        encode_request(Opcode.GETATTR, 1 << 64, 1, S.GetattrIn())
    with pytest.raises(LocalProtocolError):
        encode_reply(Opcode.INIT, 2, S.InitOut(7, 45, unused=b"short"))
    with pytest.raises(LocalProtocolError):
        encode_reply(Opcode.GETATTR, 2, S.EntryOut())
    with pytest.raises(LocalProtocolError):
        encode_reply(Opcode.BATCH_FORGET, 2, S.WriteOut(1))  # header-only row
    with pytest.raises(LocalProtocolError):
        encode_reply(Opcode.CUSE_INIT_BSWAP_RESERVED, 2)
