"""The ``Filesystem`` API: subclass it, implement what you have, and mount it.

An inode-level API in the spirit of libfuse's lowlevel API and pyfuse3's ``Operations``, with
the wire structs themselves as typed results (``EntryOut``, ``AttrOut``, ``OpenOut`` …), so a
reply is packed without conversion.  Every method has a default that raises
``FuseError(ENOSYS)``: the kernel then stops sending that request (ENOSYS is sticky for most
operations), exactly as with go-fuse's ``defaultRawFileSystem`` and virtiofsd's trait defaults.

Conventions:
- ``ino``/``parent`` are FUSE node ids (``ROOT_ID`` = 1 is the root); names are ``bytes``
  without NUL, never containing ``/`` when they come from a trusted kernel — but a backend
  serving a guest must not rely on that (the session does not filter; PassthroughFS validates).
- Fail with ``raise FuseError(errno.X)``; any other exception becomes EIO and is logged.
- Every successful ``lookup``, ``mknod``, ``mkdir``, ``symlink``, ``link``, ``create``,
  ``tmpfile`` and READDIRPLUS entry with a non-zero nodeid takes one lookup reference, which the
  kernel gives back through ``forget``.
- Methods may be called concurrently from several worker threads.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import FuseError
from ..protocol import DirEntry, InitFlags
from ..protocol.structs import (
    AttrOut,
    CopyFileRangeIn,
    EntryOut,
    FileLock,
    IoctlIn,
    IoctlOut,
    Kstatfs,
    LkIn,
    OpenOut,
    PollIn,
    PollOut,
    ReleaseIn,
    RemoveMappingOne,
    SetattrIn,
    SetupMappingIn,
    StatxIn,
    StatxOut,
)


@dataclass(frozen=True)
class Context:
    """Who asks: the caller's credentials from the request header and extensions."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0
    """For MKNOD/MKDIR/CREATE/TMPFILE: the umask the kernel did not apply (DONT_MASK/ACLs)."""
    groups: tuple[int, ...] = ()
    """Supplementary groups from the FUSE_EXT_GROUPS extension (CREATE_SUPP_GROUP)."""
    security_context: tuple[tuple[bytes, bytes], ...] = ()
    """(xattr name, label) pairs from FUSE_SECURITY_CTX for a new inode."""
    unique: int = 0
    """The request's unique id (for logging / interrupts)."""
    interrupts: Container[int] = field(default=frozenset(), repr=False, compare=False)
    """The session's live set of interrupted uniques (see ``interrupted``)."""

    @property
    def interrupted(self) -> bool:
        """True once the kernel sent FUSE_INTERRUPT for this request.

        The kernel still waits for the request's reply; a handler that waits (SETLKW, a slow
        read) should look at this and give up with ``FuseError(errno.EINTR)``.
        """
        return self.unique in self.interrupts


@dataclass
class ConnectionInfo:
    """What INIT negotiated; given to ``Filesystem.init`` which may lower the limits."""

    major: int
    minor: int
    kernel_flags: InitFlags
    """What the kernel offered."""
    flags: InitFlags
    """What will be enabled: the kernel's offer AND ``Filesystem.init_flags`` (may be edited)."""
    max_readahead: int
    max_write: int
    max_pages: int
    time_gran: int = 1
    map_alignment: int = 0
    max_background: int = 16
    congestion_threshold: int = 12
    max_stack_depth: int = 0
    extra: dict[str, object] = field(default_factory=dict)


def _enosys() -> FuseError:
    return FuseError(errno.ENOSYS)


class Filesystem:
    """Base class of every filesystem served by virtiofs.  Override what you implement."""

    init_flags: InitFlags = (
        InitFlags.ASYNC_READ | InitFlags.BIG_WRITES | InitFlags.ATOMIC_O_TRUNC
        | InitFlags.DO_READDIRPLUS | InitFlags.READDIRPLUS_AUTO | InitFlags.PARALLEL_DIROPS
        | InitFlags.MAX_PAGES | InitFlags.INIT_EXT | InitFlags.ASYNC_DIO
    )
    """INIT flags this filesystem wants; the session enables the subset the kernel offers."""

    # Lifecycle -----------------------------------------------------------------------------
    def init(self, conn: ConnectionInfo) -> None:
        """Called once INIT is negotiated, before any other request; may edit ``conn``."""

    def destroy(self) -> None:
        """The connection ends (DESTROY, unmount or transport close)."""

    # Names and attributes ------------------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> EntryOut:
        """Look ``name`` up in ``parent``; ENOENT (or an EntryOut with nodeid 0 to cache the
        negative entry for ``entry_valid``)."""
        raise _enosys()

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        """Drop ``nlookup`` references of each ``(nodeid, nlookup)``; no reply is sent."""

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> AttrOut:
        raise _enosys()

    def setattr(self, ctx: Context, ino: int, attr: SetattrIn) -> AttrOut:
        """Change what ``attr.valid`` (``SetattrValid`` bits) names; ``attr.fh`` is valid with
        ``SetattrValid.FH``."""
        raise _enosys()

    def readlink(self, ctx: Context, ino: int) -> bytes:
        raise _enosys()

    def statfs(self, ctx: Context, ino: int) -> Kstatfs:
        raise _enosys()

    def access(self, ctx: Context, ino: int, mask: int) -> None:
        raise _enosys()

    def statx(self, ctx: Context, ino: int, arg: StatxIn) -> StatxOut:
        raise _enosys()

    # Namespace -----------------------------------------------------------------------------
    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int) -> EntryOut:
        raise _enosys()

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int) -> EntryOut:
        raise _enosys()

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> EntryOut:
        raise _enosys()

    def link(self, ctx: Context, ino: int, newparent: int, newname: bytes) -> EntryOut:
        raise _enosys()

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _enosys()

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _enosys()

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        """RENAME and RENAME2; ``flags`` are ``RenameFlags`` (NOREPLACE, EXCHANGE, WHITEOUT)."""
        raise _enosys()

    # Files -----------------------------------------------------------------------------------
    def open(self, ctx: Context, ino: int, flags: int, open_flags: int) -> OpenOut:
        """``flags``: open(2) flags; ``open_flags``: ``OpenInFlags`` (KILL_SUIDGID)."""
        raise _enosys()

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               open_flags: int) -> tuple[EntryOut, OpenOut]:
        raise _enosys()

    def tmpfile(self, ctx: Context, parent: int, mode: int, flags: int,
                open_flags: int) -> tuple[EntryOut, OpenOut]:
        raise _enosys()

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes | memoryview:
        """At most ``size`` bytes; fewer means end of file (unless FOPEN_DIRECT_IO)."""
        raise _enosys()

    def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview,
              write_flags: int) -> int:
        """Write ``data`` (valid only during the call); ``write_flags`` are ``WriteFlags``."""
        raise _enosys()

    def flush(self, ctx: Context, ino: int, fh: int, lock_owner: int) -> None:
        raise _enosys()

    def release(self, ctx: Context, ino: int, arg: ReleaseIn) -> None:
        """Last close of ``arg.fh``; errors are ignored by the kernel."""

    def fsync(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        raise _enosys()

    def fallocate(self, ctx: Context, ino: int, fh: int, offset: int, length: int,
                  mode: int) -> None:
        raise _enosys()

    def lseek(self, ctx: Context, ino: int, fh: int, offset: int, whence: int) -> int:
        raise _enosys()

    def copy_file_range(self, ctx: Context, ino: int, arg: CopyFileRangeIn) -> int:
        """COPY_FILE_RANGE and COPY_FILE_RANGE_64: bytes copied."""
        raise _enosys()

    def getlk(self, ctx: Context, ino: int, arg: LkIn) -> FileLock:
        raise _enosys()

    def setlk(self, ctx: Context, ino: int, arg: LkIn, wait: bool) -> None:
        """SETLK/SETLKW; a BSD flock when ``arg.lk_flags & LkFlags.FLOCK``."""
        raise _enosys()

    def ioctl(self, ctx: Context, ino: int, arg: IoctlIn, data: memoryview) -> tuple[IoctlOut, bytes]:
        raise _enosys()

    def poll(self, ctx: Context, ino: int, arg: PollIn) -> PollOut:
        raise _enosys()

    def bmap(self, ctx: Context, ino: int, block: int, blocksize: int) -> int:
        raise _enosys()

    # Extended attributes ---------------------------------------------------------------------
    def setxattr(self, ctx: Context, ino: int, name: bytes, value: bytes, flags: int) -> None:
        raise _enosys()

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        """The whole value; the session answers size queries and ERANGE itself."""
        raise _enosys()

    def listxattr(self, ctx: Context, ino: int) -> Sequence[bytes]:
        """The names (without NUL); the session answers size queries and ERANGE itself."""
        raise _enosys()

    def removexattr(self, ctx: Context, ino: int, name: bytes) -> None:
        raise _enosys()

    # Directories -----------------------------------------------------------------------------
    def opendir(self, ctx: Context, ino: int, flags: int) -> OpenOut:
        raise _enosys()

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int) -> Iterable[DirEntry]:
        """Entries after cookie ``offset`` (0 = from the start), each with its own cookie.

        The session stops iterating when the reply buffer is full; the next READDIR resumes
        from the last cookie sent, so cookies must stay valid while the directory is open.
        """
        raise _enosys()

    def readdirplus(self, ctx: Context, ino: int, fh: int, offset: int) -> Iterable[DirEntry]:
        """Like ``readdir`` with ``DirEntry.entry`` filled (one lookup reference each).

        The default calls ``readdir`` and ``lookup`` for every name but "." and "..".  An entry
        that does not fit in the reply is given back with ``forget`` by the session.
        """
        for entry in self.readdir(ctx, ino, fh, offset):
            if entry.name in (b".", b".."):
                yield entry
            else:
                yield entry._replace(entry=self.lookup(ctx, ino, entry.name))

    def releasedir(self, ctx: Context, ino: int, fh: int) -> None:
        """Last close of a directory handle."""

    def fsyncdir(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        raise _enosys()

    def syncfs(self, ctx: Context, ino: int) -> None:
        raise _enosys()

    # virtio-fs DAX -----------------------------------------------------------------------------
    def setupmapping(self, ctx: Context, ino: int, arg: SetupMappingIn) -> None:
        """Map a file range into the DAX window (virtio-fs only)."""
        raise _enosys()

    def removemapping(self, ctx: Context, ino: int, items: Sequence[RemoveMappingOne]) -> None:
        raise _enosys()


def dirent_type(mode: int) -> int:
    """The DT_* value of a st_mode (what ``DirEntry.type`` holds)."""
    return stat.S_IFMT(mode) >> 12
