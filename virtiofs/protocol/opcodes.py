"""The opcode table: one row per FUSE opcode drives parsing, building, dispatch and printing.

Modelled on go-fuse's ``fuse/opcode.go``: each row says what follows the in_header (a fixed
struct, NUL-terminated names, trailing data or an array of items), what the reply carries, whether
there is a reply at all, since which minor the opcode exists, and which ``Filesystem`` method
handles it.  Version-dependent sizes (the ``FUSE_COMPAT_*`` sizes) are answered here too, so no
handler ever tests a minor version (STYLE.md point 3).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from . import constants as C
from . import structs as S
from .constants import InitFlags, Opcode
from .schema import sizeof


class Payload(enum.Enum):
    """Non-struct parts of a message."""

    DATA = "data"
    """Variable bytes: READ data, READLINK target, dirents, xattr values, ioctl data."""
    XATTR = "xattr"
    """GETXATTR/LISTXATTR: a ``GetxattrOut`` when the request's size is 0, else the data."""


DATA = Payload.DATA
XATTR = Payload.XATTR

ReplyPart = type[Any] | Payload


@dataclass(frozen=True, repr=False)
class OpSpec:
    """One row of the opcode table."""

    opcode: Opcode
    request: type[Any] | None
    """Fixed struct after the in_header, or None."""
    names: int
    """How many NUL-terminated names follow the fixed struct."""
    data: bool
    """Whether trailing bytes follow the names (WRITE data, SETXATTR value, …)."""
    reply: tuple[ReplyPart, ...]
    """The reply body, part by part; ``()`` is a header-only reply."""
    since: int
    """The minor version that introduced the opcode."""
    no_reply: bool = False
    """FORGET, BATCH_FORGET, NOTIFY_REPLY (and INTERRUPT, normally) get no reply."""
    items: type[Any] | None = None
    """Struct of the array after the fixed part (BATCH_FORGET, REMOVEMAPPING)."""
    data_size_field: str | None = None
    """Field of the fixed struct that must equal the data length (WRITE size, SETXATTR size)."""
    extensions: bool = False
    """May carry request extensions (security context, supplementary groups)."""

    def __repr__(self) -> str:
        return f"OpSpec({self.opcode.name})"

    @property
    def name(self) -> str:
        """The opcode's name without ``FUSE_`` (``"LOOKUP"``)."""
        return self.opcode.name

    @property
    def handler(self) -> str:
        """Name of the ``Filesystem`` method that serves this opcode."""
        return self.opcode.name.lower()

    def request_size(self, minor: int, flags: int = 0) -> int:
        """Size of the fixed request struct the kernel sends at ``minor`` with INIT ``flags``."""
        if self.request is None:
            return 0
        op = self.opcode
        if op is Opcode.GETATTR and minor < 9:
            return 0
        if op in (Opcode.READ, Opcode.WRITE) and minor < 9:
            return C.COMPAT_WRITE_IN_SIZE
        if op is Opcode.MKNOD and minor < 12:
            return C.COMPAT_MKNOD_IN_SIZE
        if op is Opcode.CREATE and minor < 12:
            return sizeof(S.OpenIn)
        if op is Opcode.SETXATTR and not flags & InitFlags.SETXATTR_EXT:
            return C.COMPAT_SETXATTR_IN_SIZE
        if op is Opcode.INIT:
            # INIT is sized by the kernel's own version (codec.init_in_size reads it from the
            # body); ``minor`` here is that version.
            if minor < 6:
                return 8
            if minor < 36:
                return C.COMPAT_INIT_IN_SIZE
        return sizeof(self.request)


def reply_struct_size(cls: type[Any], minor: int) -> int:
    """Size of a fixed reply struct at ``minor`` (FUSE_COMPAT_* sizes)."""
    if cls is S.EntryOut and minor < 9:
        return C.COMPAT_ENTRY_OUT_SIZE
    if cls is S.AttrOut and minor < 9:
        return C.COMPAT_ATTR_OUT_SIZE
    if cls is S.StatfsOut and minor < 4:
        return C.COMPAT_STATFS_SIZE
    if cls is S.InitOut:
        if minor < 5:
            return C.COMPAT_INIT_OUT_SIZE
        if minor < 23:
            return C.COMPAT_22_INIT_OUT_SIZE
    return sizeof(cls)


def _row(op: Opcode, request: type[Any] | None, reply: tuple[ReplyPart, ...], since: int,
         *, names: int = 0, data: bool = False, **kw: Any) -> OpSpec:
    return OpSpec(op, request, names, data, reply, since, **kw)


_E = (S.EntryOut,)
OPCODES: dict[Opcode, OpSpec] = {row.opcode: row for row in (
    _row(Opcode.LOOKUP, None, _E, 0, names=1),
    _row(Opcode.FORGET, S.ForgetIn, (), 0, no_reply=True),
    _row(Opcode.GETATTR, S.GetattrIn, (S.AttrOut,), 0),
    _row(Opcode.SETATTR, S.SetattrIn, (S.AttrOut,), 0),
    _row(Opcode.READLINK, None, (DATA,), 0),
    _row(Opcode.SYMLINK, None, _E, 1, names=2, extensions=True),
    _row(Opcode.MKNOD, S.MknodIn, _E, 1, names=1, extensions=True),
    _row(Opcode.MKDIR, S.MkdirIn, _E, 1, names=1, extensions=True),
    _row(Opcode.UNLINK, None, (), 1, names=1),
    _row(Opcode.RMDIR, None, (), 1, names=1),
    _row(Opcode.RENAME, S.RenameIn, (), 1, names=2),
    _row(Opcode.LINK, S.LinkIn, _E, 1, names=1),
    _row(Opcode.OPEN, S.OpenIn, (S.OpenOut,), 1),
    _row(Opcode.READ, S.ReadIn, (DATA,), 1),
    _row(Opcode.WRITE, S.WriteIn, (S.WriteOut,), 1, data=True, data_size_field="size"),
    _row(Opcode.STATFS, None, (S.StatfsOut,), 0),
    _row(Opcode.RELEASE, S.ReleaseIn, (), 1),
    _row(Opcode.FSYNC, S.FsyncIn, (), 1),
    _row(Opcode.SETXATTR, S.SetxattrIn, (), 1, names=1, data=True, data_size_field="size"),
    _row(Opcode.GETXATTR, S.GetxattrIn, (XATTR,), 1, names=1),
    _row(Opcode.LISTXATTR, S.GetxattrIn, (XATTR,), 1),
    _row(Opcode.REMOVEXATTR, None, (), 1, names=1),
    _row(Opcode.FLUSH, S.FlushIn, (), 1),
    _row(Opcode.INIT, S.InitIn, (S.InitOut,), 0),
    _row(Opcode.OPENDIR, S.OpenIn, (S.OpenOut,), 1),
    _row(Opcode.READDIR, S.ReadIn, (DATA,), 1),
    _row(Opcode.RELEASEDIR, S.ReleaseIn, (), 1),
    _row(Opcode.FSYNCDIR, S.FsyncIn, (), 2),
    _row(Opcode.GETLK, S.LkIn, (S.LkOut,), 7),
    _row(Opcode.SETLK, S.LkIn, (), 7),
    _row(Opcode.SETLKW, S.LkIn, (), 7),
    _row(Opcode.ACCESS, S.AccessIn, (), 3),
    _row(Opcode.CREATE, S.CreateIn, (S.EntryOut, S.OpenOut), 3, names=1, extensions=True),
    _row(Opcode.INTERRUPT, S.InterruptIn, (), 7, no_reply=True),
    _row(Opcode.BMAP, S.BmapIn, (S.BmapOut,), 8),
    _row(Opcode.DESTROY, None, (), 8),
    _row(Opcode.IOCTL, S.IoctlIn, (S.IoctlOut, DATA), 11, data=True, data_size_field="in_size"),
    _row(Opcode.POLL, S.PollIn, (S.PollOut,), 11),
    _row(Opcode.NOTIFY_REPLY, S.NotifyRetrieveIn, (), 15, data=True, no_reply=True,
         data_size_field="size"),
    _row(Opcode.BATCH_FORGET, S.BatchForgetIn, (), 16, no_reply=True, items=S.ForgetOne),
    _row(Opcode.FALLOCATE, S.FallocateIn, (), 19),
    _row(Opcode.READDIRPLUS, S.ReadIn, (DATA,), 21),
    _row(Opcode.RENAME2, S.Rename2In, (), 23, names=2),
    _row(Opcode.LSEEK, S.LseekIn, (S.LseekOut,), 24),
    _row(Opcode.COPY_FILE_RANGE, S.CopyFileRangeIn, (S.WriteOut,), 28),
    _row(Opcode.SETUPMAPPING, S.SetupMappingIn, (), 31),
    _row(Opcode.REMOVEMAPPING, S.RemoveMappingIn, (), 31, items=S.RemoveMappingOne),
    _row(Opcode.SYNCFS, S.SyncfsIn, (), 34),
    _row(Opcode.TMPFILE, S.CreateIn, (S.EntryOut, S.OpenOut), 37, names=1, extensions=True),
    _row(Opcode.STATX, S.StatxIn, (S.StatxOut,), 39),
    _row(Opcode.COPY_FILE_RANGE_64, S.CopyFileRangeIn, (S.CopyFileRangeOut,), 45),
    _row(Opcode.CUSE_INIT, S.CuseInitIn, (S.CuseInitOut, DATA), 11),
)}
"""Every opcode of fuse.h 7.45 (the two BSWAP_RESERVED numbers are markers, not operations)."""

BY_NUMBER: dict[int, OpSpec] = {int(op): spec for op, spec in OPCODES.items()}
"""The same table keyed by plain int, for the hot path (no enum construction per request)."""

for _spec in OPCODES.values():
    # Items and data are mutually exclusive, a count field must exist, and variable data is
    # only ever the last reply part (the kernel's out_argvar rule): checked once here.
    assert not (_spec.items and _spec.data), _spec
    assert _spec.items is None or "count" in _spec.request._fields, _spec  # type: ignore[union-attr]
    assert all(p not in (DATA, XATTR) for p in _spec.reply[:-1]), _spec
    assert _spec.request is None or _spec.data_size_field is None or \
        _spec.data_size_field in _spec.request._fields, _spec


@dataclass(frozen=True)
class NotifyRow:
    """One notification (server -> kernel, ``unique = 0``, ``error = code``)."""

    code: C.NotifyCode
    struct: type[Any] | None
    name: bool = False
    """A NUL-terminated name follows (its length is the struct's ``namelen``, NUL excluded)."""
    data: bool = False
    """Trailing data of the struct's ``size`` bytes (STORE)."""
    nodeids: bool = False
    """``count`` u64 node ids follow (PRUNE)."""
    since: int = 0


NOTIFICATIONS: dict[C.NotifyCode, NotifyRow] = {row.code: row for row in (
    NotifyRow(C.NotifyCode.POLL, S.NotifyPollWakeupOut, since=11),
    NotifyRow(C.NotifyCode.INVAL_INODE, S.NotifyInvalInodeOut, since=12),
    NotifyRow(C.NotifyCode.INVAL_ENTRY, S.NotifyInvalEntryOut, name=True, since=12),
    NotifyRow(C.NotifyCode.STORE, S.NotifyStoreOut, data=True, since=15),
    NotifyRow(C.NotifyCode.RETRIEVE, S.NotifyRetrieveOut, since=15),
    NotifyRow(C.NotifyCode.DELETE, S.NotifyDeleteOut, name=True, since=18),
    NotifyRow(C.NotifyCode.RESEND, None, since=40),
    NotifyRow(C.NotifyCode.INC_EPOCH, None, since=44),
    NotifyRow(C.NotifyCode.PRUNE, S.NotifyPruneOut, nodeids=True, since=45),
)}
