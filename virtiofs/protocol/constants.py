"""Numbers of the FUSE protocol, from the Linux uapi ``fuse.h`` at 7.45 (see shared/docs/SPEC.md).

The one place constants live; nothing else in the package repeats them as literals.
"""

from __future__ import annotations

import enum

KERNEL_VERSION = 7
"""FUSE_KERNEL_VERSION: the major we speak."""
KERNEL_MINOR_VERSION = 45
"""FUSE_KERNEL_MINOR_VERSION of the header we implement."""
ROOT_ID = 1
"""FUSE_ROOT_ID."""
MIN_READ_BUFFER = 8192
"""FUSE_MIN_READ_BUFFER: a /dev/fuse read buffer is never smaller."""
INT_REQ_BIT = 1
"""An INTERRUPT for request U carries unique U | 1 (fs/fuse/fuse_dev_i.h)."""
UNIQUE_RESEND = 1 << 63
"""FUSE_UNIQUE_RESEND: marks a resent request (7.40)."""
INVALID_UIDGID = 0xFFFFFFFF
NAME_MAX = 1024
"""FUSE_NAME_MAX: longest name the kernel accepts in a dirent."""
DIRENT_ALIGN = 8
ERRNO_LIMIT = 512
"""A reply's error must be 0 or in (-512, 0): the kernel rejects others (fuse: reject internal errno)."""
COMPAT_ENTRY_OUT_SIZE = 120
COMPAT_ATTR_OUT_SIZE = 96
COMPAT_MKNOD_IN_SIZE = 8
COMPAT_WRITE_IN_SIZE = 24
COMPAT_STATFS_SIZE = 48
COMPAT_SETXATTR_IN_SIZE = 8
COMPAT_INIT_OUT_SIZE = 8
COMPAT_22_INIT_OUT_SIZE = 24
COMPAT_INIT_IN_SIZE = 16
"""fuse_init_in before 7.36 (no flags2 and reserved words)."""
CUSE_INIT_INFO_MAX = 4096
IOCTL_MAX_IOV = 256
REMOVEMAPPING_MAX_ENTRY = 4096 // 16
DAX_SHIFT = 21
"""Linux maps DAX in fixed 2 MiB ranges (fs/fuse/dax.c FUSE_DAX_SHIFT) and refuses larger alignments."""
MAX_NR_SECCTX = 31
DEFAULT_MAX_PAGES_PER_REQ = 32
MAX_MAX_PAGES = 256
"""Kernel default fuse_max_pages_limit."""


class Opcode(enum.IntEnum):
    """enum fuse_opcode."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53
    CUSE_INIT = 4096
    # Reserved opcodes that reveal a peer of the other endianness (the INIT number byte-swapped).
    CUSE_INIT_BSWAP_RESERVED = 1048576
    INIT_BSWAP_RESERVED = 436207616


class NotifyCode(enum.IntEnum):
    """enum fuse_notify_code: ``out_header.error`` of an unsolicited server->kernel message."""

    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7
    INC_EPOCH = 8
    PRUNE = 9


class InitFlags(enum.IntFlag):
    """INIT flags as one 64-bit word: ``flags | flags2 << 32`` (flags2 valid with INIT_EXT)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


class OpenFlags(enum.IntFlag):
    """FOPEN_* in fuse_open_out.open_flags."""

    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6
    PASSTHROUGH = 1 << 7


class OpenInFlags(enum.IntFlag):
    """fuse_open_in.open_flags / fuse_create_in.open_flags."""

    KILL_SUIDGID = 1 << 0


class SetattrValid(enum.IntFlag):
    """FATTR_* in fuse_setattr_in.valid."""

    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


class AttrFlags(enum.IntFlag):
    """fuse_attr.flags."""

    SUBMOUNT = 1 << 0
    DAX = 1 << 1


class ReleaseFlags(enum.IntFlag):
    FLUSH = 1 << 0
    FLOCK_UNLOCK = 1 << 1


class GetattrFlags(enum.IntFlag):
    FH = 1 << 0


class WriteFlags(enum.IntFlag):
    CACHE = 1 << 0
    LOCKOWNER = 1 << 1
    KILL_SUIDGID = 1 << 2


class ReadFlags(enum.IntFlag):
    LOCKOWNER = 1 << 1


class IoctlFlags(enum.IntFlag):
    COMPAT = 1 << 0
    UNRESTRICTED = 1 << 1
    RETRY = 1 << 2
    IOCTL_32BIT = 1 << 3
    DIR = 1 << 4
    COMPAT_X32 = 1 << 5


class FsyncFlags(enum.IntFlag):
    FDATASYNC = 1 << 0


class LkFlags(enum.IntFlag):
    FLOCK = 1 << 0


class PollFlags(enum.IntFlag):
    SCHEDULE_NOTIFY = 1 << 0


class SetxattrFlags(enum.IntFlag):
    """fuse_setxattr_in.setxattr_flags (with SETXATTR_EXT)."""

    ACL_KILL_SGID = 1 << 0


class SetupMappingFlags(enum.IntFlag):
    """fuse_setupmapping_in.flags: WRITE is bit 0 and READ bit 1 (the reverse of old vhost-user)."""

    WRITE = 1 << 0
    READ = 1 << 1


class NotifyInvalEntryFlags(enum.IntFlag):
    EXPIRE_ONLY = 1 << 0


class ExtType(enum.IntEnum):
    """enum fuse_ext_type: types 0..31 are the security-context block (its nr_secctx)."""

    GROUPS = 32


class RenameFlags(enum.IntFlag):
    """renameat2 flags carried by RENAME2."""

    NOREPLACE = 1 << 0
    EXCHANGE = 1 << 1
    WHITEOUT = 1 << 2


# /dev/fuse ioctls (magic 229), computed from the header on x86-64 (SPEC.md 1.5).
DEV_IOC_CLONE = 0x8004E500
DEV_IOC_BACKING_OPEN = 0x4010E501
DEV_IOC_BACKING_CLOSE = 0x4004E502
DEV_IOC_SYNC_INIT = 0xE503
