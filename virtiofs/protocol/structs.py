"""Every struct of the uapi ``fuse.h`` (7.45), declared once.

Naming rule: the kernel name without ``fuse_`` in CamelCase (``fuse_in_header`` -> ``InHeader``,
``cuse_init_out`` -> ``CuseInitOut``); fields keep the kernel's names (``__spare0`` ->
``spare0``).  Each class is a ``NamedTuple`` (typed, immutable, cheap) whose annotations carry the
construct type; ``schema.schema(cls)`` is its construct ``Struct`` and ``schema.codec(cls)`` its
fast path.  Sizes are checked against the compiled header at import (``SIZES`` below).
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import construct as cs

from .schema import s32, s64, sizeof, u16, u32, u64


class InHeader(NamedTuple):
    len: u32
    opcode: u32
    unique: u64
    nodeid: u64
    uid: u32
    gid: u32
    pid: u32
    total_extlen: u16 = 0
    """Length of the extension records in 8-byte units (7.38)."""
    padding: u16 = 0


class OutHeader(NamedTuple):
    len: u32
    error: s32
    unique: u64


class Attr(NamedTuple):
    ino: u64 = 0
    size: u64 = 0
    blocks: u64 = 0
    atime: u64 = 0
    mtime: u64 = 0
    ctime: u64 = 0
    atimensec: u32 = 0
    mtimensec: u32 = 0
    ctimensec: u32 = 0
    mode: u32 = 0
    nlink: u32 = 0
    uid: u32 = 0
    gid: u32 = 0
    rdev: u32 = 0
    blksize: u32 = 0
    flags: u32 = 0


class SxTime(NamedTuple):
    tv_sec: s64 = 0
    tv_nsec: u32 = 0
    reserved: s32 = 0


class Statx(NamedTuple):
    mask: u32 = 0
    blksize: u32 = 0
    attributes: u64 = 0
    nlink: u32 = 0
    uid: u32 = 0
    gid: u32 = 0
    mode: u16 = 0
    spare0: u16 = 0
    ino: u64 = 0
    size: u64 = 0
    blocks: u64 = 0
    attributes_mask: u64 = 0
    atime: SxTime = SxTime()
    btime: SxTime = SxTime()
    ctime: SxTime = SxTime()
    mtime: SxTime = SxTime()
    rdev_major: u32 = 0
    rdev_minor: u32 = 0
    dev_major: u32 = 0
    dev_minor: u32 = 0
    spare2: Annotated[bytes, cs.Bytes(112)] = bytes(112)


class Kstatfs(NamedTuple):
    blocks: u64 = 0
    bfree: u64 = 0
    bavail: u64 = 0
    files: u64 = 0
    ffree: u64 = 0
    bsize: u32 = 0
    namelen: u32 = 0
    frsize: u32 = 0
    padding: u32 = 0
    spare: Annotated[bytes, cs.Bytes(24)] = bytes(24)


class FileLock(NamedTuple):
    start: u64 = 0
    end: u64 = 0
    type: u32 = 0
    pid: u32 = 0


class EntryOut(NamedTuple):
    nodeid: u64 = 0
    generation: u64 = 0
    entry_valid: u64 = 0
    attr_valid: u64 = 0
    entry_valid_nsec: u32 = 0
    attr_valid_nsec: u32 = 0
    attr: Attr = Attr()


class ForgetIn(NamedTuple):
    nlookup: u64


class ForgetOne(NamedTuple):
    nodeid: u64
    nlookup: u64


class BatchForgetIn(NamedTuple):
    count: u32  # type: ignore[assignment]  # the kernel name shadows tuple.count
    dummy: u32 = 0


class GetattrIn(NamedTuple):
    getattr_flags: u32 = 0
    dummy: u32 = 0
    fh: u64 = 0


class AttrOut(NamedTuple):
    attr_valid: u64 = 0
    attr_valid_nsec: u32 = 0
    dummy: u32 = 0
    attr: Attr = Attr()


class StatxIn(NamedTuple):
    getattr_flags: u32 = 0
    reserved: u32 = 0
    fh: u64 = 0
    sx_flags: u32 = 0
    sx_mask: u32 = 0


class StatxOut(NamedTuple):
    attr_valid: u64 = 0
    attr_valid_nsec: u32 = 0
    flags: u32 = 0
    spare: Annotated[bytes, cs.Bytes(16)] = bytes(16)
    stat: Statx = Statx()


class MknodIn(NamedTuple):
    mode: u32
    rdev: u32
    umask: u32 = 0
    padding: u32 = 0


class MkdirIn(NamedTuple):
    mode: u32
    umask: u32 = 0


class RenameIn(NamedTuple):
    newdir: u64


class Rename2In(NamedTuple):
    newdir: u64
    flags: u32 = 0
    padding: u32 = 0


class LinkIn(NamedTuple):
    oldnodeid: u64


class SetattrIn(NamedTuple):
    valid: u32 = 0
    padding: u32 = 0
    fh: u64 = 0
    size: u64 = 0
    lock_owner: u64 = 0
    atime: u64 = 0
    mtime: u64 = 0
    ctime: u64 = 0
    atimensec: u32 = 0
    mtimensec: u32 = 0
    ctimensec: u32 = 0
    mode: u32 = 0
    unused4: u32 = 0
    uid: u32 = 0
    gid: u32 = 0
    unused5: u32 = 0


class OpenIn(NamedTuple):
    flags: u32
    open_flags: u32 = 0


class CreateIn(NamedTuple):
    flags: u32
    mode: u32
    umask: u32 = 0
    open_flags: u32 = 0


class OpenOut(NamedTuple):
    fh: u64 = 0
    open_flags: u32 = 0
    backing_id: s32 = 0


class ReleaseIn(NamedTuple):
    fh: u64
    flags: u32 = 0
    release_flags: u32 = 0
    lock_owner: u64 = 0


class FlushIn(NamedTuple):
    fh: u64
    unused: u32 = 0
    padding: u32 = 0
    lock_owner: u64 = 0


class ReadIn(NamedTuple):
    fh: u64
    offset: u64
    size: u32
    read_flags: u32 = 0
    lock_owner: u64 = 0
    flags: u32 = 0
    padding: u32 = 0


class WriteIn(NamedTuple):
    fh: u64
    offset: u64
    size: u32
    write_flags: u32 = 0
    lock_owner: u64 = 0
    flags: u32 = 0
    padding: u32 = 0


class WriteOut(NamedTuple):
    size: u32
    padding: u32 = 0


class StatfsOut(NamedTuple):
    st: Kstatfs = Kstatfs()


class FsyncIn(NamedTuple):
    fh: u64
    fsync_flags: u32 = 0
    padding: u32 = 0


class SetxattrIn(NamedTuple):
    size: u32
    flags: u32 = 0
    setxattr_flags: u32 = 0
    padding: u32 = 0


class GetxattrIn(NamedTuple):
    size: u32
    padding: u32 = 0


class GetxattrOut(NamedTuple):
    size: u32
    padding: u32 = 0


class LkIn(NamedTuple):
    fh: u64
    owner: u64
    lk: FileLock = FileLock()
    lk_flags: u32 = 0
    padding: u32 = 0


class LkOut(NamedTuple):
    lk: FileLock = FileLock()


class AccessIn(NamedTuple):
    mask: u32
    padding: u32 = 0


class InitIn(NamedTuple):
    major: u32
    minor: u32
    max_readahead: u32 = 0
    flags: u32 = 0
    flags2: u32 = 0
    unused: Annotated[bytes, cs.Bytes(44)] = bytes(44)


class InitOut(NamedTuple):
    major: u32
    minor: u32
    max_readahead: u32 = 0
    flags: u32 = 0
    max_background: u16 = 0
    congestion_threshold: u16 = 0
    max_write: u32 = 0
    time_gran: u32 = 0
    max_pages: u16 = 0
    map_alignment: u16 = 0
    flags2: u32 = 0
    max_stack_depth: u32 = 0
    request_timeout: u16 = 0
    unused: Annotated[bytes, cs.Bytes(22)] = bytes(22)


class CuseInitIn(NamedTuple):
    major: u32
    minor: u32
    unused: u32 = 0
    flags: u32 = 0


class CuseInitOut(NamedTuple):
    major: u32
    minor: u32
    unused: u32 = 0
    flags: u32 = 0
    max_read: u32 = 0
    max_write: u32 = 0
    dev_major: u32 = 0
    dev_minor: u32 = 0
    spare: Annotated[bytes, cs.Bytes(40)] = bytes(40)


class InterruptIn(NamedTuple):
    unique: u64


class BmapIn(NamedTuple):
    block: u64
    blocksize: u32
    padding: u32 = 0


class BmapOut(NamedTuple):
    block: u64


class IoctlIn(NamedTuple):
    fh: u64
    flags: u32
    cmd: u32
    arg: u64
    in_size: u32
    out_size: u32


class IoctlIovec(NamedTuple):
    base: u64
    len: u64


class IoctlOut(NamedTuple):
    result: s32
    flags: u32 = 0
    in_iovs: u32 = 0
    out_iovs: u32 = 0


class PollIn(NamedTuple):
    fh: u64
    kh: u64
    flags: u32 = 0
    events: u32 = 0


class PollOut(NamedTuple):
    revents: u32
    padding: u32 = 0


class NotifyPollWakeupOut(NamedTuple):
    kh: u64


class FallocateIn(NamedTuple):
    fh: u64
    offset: u64
    length: u64
    mode: u32 = 0
    padding: u32 = 0


class Dirent(NamedTuple):
    """The fixed part of ``fuse_dirent``; the name follows, padded to 8 bytes."""

    ino: u64
    off: u64
    namelen: u32
    type: u32


class DirentPlus(NamedTuple):
    """The fixed part of ``fuse_direntplus``: an entry_out, then a dirent, then the name."""

    entry_out: EntryOut
    dirent: Dirent


class NotifyInvalInodeOut(NamedTuple):
    ino: u64
    off: s64 = 0
    len: s64 = 0


class NotifyInvalEntryOut(NamedTuple):
    parent: u64
    namelen: u32
    flags: u32 = 0


class NotifyDeleteOut(NamedTuple):
    parent: u64
    child: u64
    namelen: u32
    padding: u32 = 0


class NotifyStoreOut(NamedTuple):
    nodeid: u64
    offset: u64
    size: u32
    padding: u32 = 0


class NotifyRetrieveOut(NamedTuple):
    notify_unique: u64
    nodeid: u64
    offset: u64
    size: u32
    padding: u32 = 0


class NotifyRetrieveIn(NamedTuple):
    """The kernel's NOTIFY_REPLY request body (data follows)."""

    dummy1: u64
    offset: u64
    size: u32
    dummy2: u32 = 0
    dummy3: u64 = 0
    dummy4: u64 = 0


class NotifyPruneOut(NamedTuple):
    count: u32  # type: ignore[assignment]  # the kernel name shadows tuple.count
    padding: u32 = 0
    spare: u64 = 0


class BackingMap(NamedTuple):
    fd: s32
    flags: u32 = 0
    padding: u64 = 0


class LseekIn(NamedTuple):
    fh: u64
    offset: u64
    """``uint64_t`` in fuse.h although it carries a loff_t (a negative offset never reaches it)."""
    whence: u32
    padding: u32 = 0


class LseekOut(NamedTuple):
    offset: u64


class CopyFileRangeIn(NamedTuple):
    fh_in: u64
    off_in: u64
    nodeid_out: u64
    fh_out: u64
    off_out: u64
    len: u64
    flags: u64 = 0


class CopyFileRangeOut(NamedTuple):
    bytes_copied: u64


class SetupMappingIn(NamedTuple):
    fh: u64
    foffset: u64
    len: u64
    flags: u64
    moffset: u64


class RemoveMappingIn(NamedTuple):
    count: u32  # type: ignore[assignment]  # the kernel name shadows tuple.count


class RemoveMappingOne(NamedTuple):
    moffset: u64
    len: u64


class SyncfsIn(NamedTuple):
    padding: u64 = 0


class SecctxHeader(NamedTuple):
    size: u32
    nr_secctx: u32


class Secctx(NamedTuple):
    size: u32
    padding: u32 = 0


class ExtHeader(NamedTuple):
    size: u32
    type: u32


class SuppGroups(NamedTuple):
    nr_groups: u32


class UringEntInOut(NamedTuple):
    flags: u64 = 0
    commit_id: u64 = 0
    payload_sz: u32 = 0
    padding: u32 = 0
    reserved: u64 = 0


class UringCmdReq(NamedTuple):
    flags: u64 = 0
    commit_id: u64 = 0
    qid: u16 = 0
    padding: Annotated[bytes, cs.Bytes(6)] = bytes(6)


class UringReqHeader(NamedTuple):
    """fuse_uring_req_header: in_out (128) + op_in (128) + ring_ent_in_out (32)."""

    in_out: Annotated[bytes, cs.Bytes(128)] = bytes(128)
    op_in: Annotated[bytes, cs.Bytes(128)] = bytes(128)
    ring_ent_in_out: UringEntInOut = UringEntInOut()


# sizeof() of each struct, measured by compiling the 7.45 header on x86-64 (SPEC.md 1.3).
# Checked at import: a wrong declaration must never reach the wire (go-fuse checkFixedBufferSize).
SIZES: dict[type[tuple[object, ...]], int] = {
    InHeader: 40, OutHeader: 16, Attr: 88, SxTime: 16, Statx: 256, Kstatfs: 80, FileLock: 24,
    EntryOut: 128, ForgetIn: 8, ForgetOne: 16, BatchForgetIn: 8, GetattrIn: 16, AttrOut: 104,
    StatxIn: 24, StatxOut: 288, MknodIn: 16, MkdirIn: 8, RenameIn: 8, Rename2In: 16, LinkIn: 8,
    SetattrIn: 88, OpenIn: 8, CreateIn: 16, OpenOut: 16, ReleaseIn: 24, FlushIn: 24,
    ReadIn: 40, WriteIn: 40, WriteOut: 8, StatfsOut: 80, FsyncIn: 16, SetxattrIn: 16,
    GetxattrIn: 8, GetxattrOut: 8, LkIn: 48, LkOut: 24, AccessIn: 8, InitIn: 64, InitOut: 64,
    CuseInitIn: 16, CuseInitOut: 72, InterruptIn: 8, BmapIn: 16, BmapOut: 8, IoctlIn: 32,
    IoctlIovec: 16, IoctlOut: 16, PollIn: 24, PollOut: 8, NotifyPollWakeupOut: 8,
    FallocateIn: 32, Dirent: 24, DirentPlus: 152, NotifyInvalInodeOut: 24,
    NotifyInvalEntryOut: 16, NotifyDeleteOut: 24, NotifyStoreOut: 24, NotifyRetrieveOut: 32,
    NotifyRetrieveIn: 40, NotifyPruneOut: 16, BackingMap: 16, LseekIn: 24, LseekOut: 8,
    CopyFileRangeIn: 56, CopyFileRangeOut: 8, SetupMappingIn: 40, RemoveMappingIn: 4,
    RemoveMappingOne: 16, SyncfsIn: 8, SecctxHeader: 8, Secctx: 8, ExtHeader: 8,
    SuppGroups: 4, UringEntInOut: 32, UringReqHeader: 288, UringCmdReq: 24,
}

for _cls, _size in SIZES.items():
    if sizeof(_cls) != _size:  # pragma: no cover - a declaration error, caught at import
        raise AssertionError(f"{_cls.__name__}: {sizeof(_cls)} bytes, fuse.h says {_size}")
