"""Server-side DAX: FUSE_SETUPMAPPING / FUSE_REMOVEMAPPING checked here, carried out by the
owner of the window.

A virtio-fs device maps file ranges into its shared-memory region 0 (the DAX window) when the
driver asks with FUSE_SETUPMAPPING and takes them away with FUSE_REMOVEMAPPING (SPEC 1.8, 2.1).
The filesystem (PassthroughFS) has the files; the window belongs to whoever plays the
front-end: QEMU or our vhost-user front-end (SHMEM_MAP/SHMEM_UNMAP on the back-end channel,
SPEC 3.5), or the driver itself when client and server share a process (the loopback path).
The transport hands the filesystem a :class:`DaxMapper` for that window in
``ConnectionInfo.extra[DAX_EXTRA_KEY]`` ("dax") before INIT; without one, SETUPMAPPING answers
ENOSYS and the driver falls back to FUSE_READ/FUSE_WRITE ("Driver SHOULD fall back when region
0 is absent").

:class:`DaxServer` is what a filesystem keeps per connection: it validates each request
completely *before* anything is mapped (SECURITY.md B1 #13, B6 #13: a hostile guest gets an
errno and the window is unchanged), keeps the table of live mappings, and forwards to the
mapper. Rules, with the errno answered:

- ``flags``: only ``FUSE_SETUPMAPPING_FLAG_READ | _WRITE`` (WRITE = bit 0, READ = bit 1,
  FACTS.md); any other bit is EINVAL. A WRITE mapping needs a file opened O_RDWR, so a
  read-only export answers EROFS and a read-only host file EACCES (the filesystem's open).
- ``len``: non-zero, a multiple of the page size; ``moffset`` and ``foffset`` aligned to
  ``1 << map_alignment`` (we advertise ``map_alignment = 12``, the page; Linux refuses > 21 and
  always sends 2 MiB ranges at 2 MiB offsets, so it never notices); ``moffset + len`` inside the
  window when its size is known (written as cloud-hypervisor's ``is_req_valid``, which cannot
  overflow); ``foffset + len`` within ``off_t``. All EINVAL.
- overlap: a request naming exactly an existing mapping (same ``moffset`` and ``len``) replaces
  it -- the kernel upgrades a read-only range to writable that way
  (``fuse_upgrade_dax_mapping``); any other overlap is EINVAL (the virtio spec allows a device
  to split partial overlaps; no driver needs it, and refusing keeps the bookkeeping exact).
- past EOF: ``foffset`` at or beyond the file size is EINVAL. A range may *end* past EOF (the
  kernel maps whole 2 MiB ranges of small files) but a range wholly past it can only fault:
  Linux reads holes past ``i_size`` without mapping and sends extending writes as FUSE_WRITE
  (``fuse_dax_write_iter`` -> ``fuse_dax_direct_write``).
- ``fh``: ``2**64 - 1`` (what Linux sends, FACTS.md) maps by node id with a descriptor opened
  for the purpose; any other value must be an open handle of that node (EBADF otherwise: a
  closed or foreign handle maps nothing). Only regular files (EBADF otherwise, the
  CVE-2020-35517 rule: no device memory in the window).
- resources: at most ``max_mappings`` live mappings (ENOMEM, the spec's "resources may run
  out").
- REMOVEMAPPING: 1..256 entries (``FUSE_REMOVEMAPPING_MAX_ENTRY``; EINVAL otherwise), each
  naming exactly one live mapping of *this* node id, no duplicates; or a single entry with
  ``len = 2**64 - 1`` (cloud-hypervisor's "whole window" length), which removes everything.
  All entries are checked before the first is unmapped.

Errors of the mapper (the front-end refusing SHMEM_MAP, the window's own checks) come back as
``FuseError`` with their errno and leave the table as it was.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from ..errors import DaxMappingError, FuseError, LocalProtocolError
from ..protocol import InitFlags
from ..protocol.constants import DAX_SHIFT, REMOVEMAPPING_MAX_ENTRY, SetupMappingFlags
from ..protocol.structs import RemoveMappingOne, SetupMappingIn
from .filesystem import ConnectionInfo

if TYPE_CHECKING:
    from ..dax.window import DaxWindow

__all__ = [
    "DAX_EXTRA_KEY",
    "FH_NONE",
    "MAP_ALIGNMENT",
    "U64_MAX",
    "DaxMapper",
    "DaxServer",
    "ServerMapping",
    "WindowDaxMapper",
    "check_setupmapping",
]

log = logging.getLogger("virtiofs.dax")

#: ``ConnectionInfo.extra`` key under which a transport offers its :class:`DaxMapper`.
DAX_EXTRA_KEY: Final = "dax"
#: ``fuse_setupmapping_in.fh`` of the Linux driver: map by node id (FACTS.md).
FH_NONE: Final = (1 << 64) - 1
U64_MAX: Final = (1 << 64) - 1
PAGE_SIZE: Final = mmap.PAGESIZE
#: ``fuse_init_out.map_alignment`` we advertise: log2 of the page size (12). mmap cannot place
#: anything finer, and Linux refuses values above FUSE_DAX_SHIFT (21).
MAP_ALIGNMENT: Final = PAGE_SIZE.bit_length() - 1
_OFF_T_MAX: Final = (1 << 63) - 1
_KNOWN_FLAGS: Final = int(SetupMappingFlags.READ | SetupMappingFlags.WRITE)


@runtime_checkable
class DaxMapper(Protocol):
    """Whoever owns the DAX window, seen from the filesystem.

    ``map`` puts ``length`` bytes of ``fd`` at ``foffset`` into the window at ``moffset``
    (writable or read-only); the caller keeps ``fd`` and closes it afterwards (a mapping holds
    its file). ``unmap`` takes one whole mapping away; ``length == 2**64 - 1`` removes every
    mapping. Both raise :class:`~virtiofs.errors.FuseError` with the errno to answer when the
    window owner refuses. ``window_size`` is the window's size when known (None: only the
    owner can check bounds).
    """

    @property
    def window_size(self) -> int | None: ...

    def map(self, fd: int, foffset: int, moffset: int, length: int, writable: bool) -> None: ...

    def unmap(self, moffset: int, length: int) -> None: ...


class WindowDaxMapper:
    """A :class:`DaxMapper` straight onto a :class:`~virtiofs.dax.window.DaxWindow` in this
    process: the in-process path (client and server in one process, e.g. the loopback
    transport or a ``SessionChannel``), where no vhost-user message is needed::

        window = DaxWindow(64 << 20)
        session = Session(PassthroughFS(root))
        session.extra[DAX_EXTRA_KEY] = WindowDaxMapper(window)
        client = Client(SessionChannel(session), cache="always", dax=window)
    """

    def __init__(self, window: DaxWindow) -> None:
        self.window = window

    @property
    def window_size(self) -> int | None:
        return self.window.size

    def map(self, fd: int, foffset: int, moffset: int, length: int, writable: bool) -> None:
        try:
            self.window.map(moffset, length, fd, foffset, writable)
        except DaxMappingError as e:
            raise FuseError(e.errno, str(e)) from None
        except LocalProtocolError as e:  # the window was closed under us
            raise FuseError(errno.EIO, str(e)) from None

    def unmap(self, moffset: int, length: int) -> None:
        try:
            self.window.unmap(moffset, length)
        except DaxMappingError as e:
            raise FuseError(e.errno, str(e)) from None
        except LocalProtocolError as e:
            raise FuseError(errno.EIO, str(e)) from None


@dataclass(frozen=True, slots=True)
class ServerMapping:
    """One live mapping as the server recorded it."""

    moffset: int
    length: int
    foffset: int
    writable: bool
    nodeid: int

    @property
    def end(self) -> int:
        return self.moffset + self.length


def _refuse(err: int, what: str) -> FuseError:
    log.debug("DAX request refused (%s): %s", errno.errorcode.get(err, err), what)
    return FuseError(err, what)


def check_setupmapping(arg: SetupMappingIn, *, window_size: int | None = None,
                       alignment: int = PAGE_SIZE) -> bool:
    """Validate a ``fuse_setupmapping_in`` on its own (no table, no file); returns whether the
    mapping is writable. Raises ``FuseError(EINVAL)`` for anything outside the rules of the
    module docstring."""
    for name in ("fh", "foffset", "len", "flags", "moffset"):
        v = getattr(arg, name)
        if type(v) is not int or not 0 <= v <= U64_MAX:
            raise _refuse(errno.EINVAL, f"{name} {v!r} is not a u64")
    if arg.flags & ~_KNOWN_FLAGS:
        raise _refuse(errno.EINVAL, f"unknown SETUPMAPPING flags {arg.flags:#x}")
    length, moffset, foffset = arg.len, arg.moffset, arg.foffset
    if length == 0 or length % PAGE_SIZE:
        raise _refuse(errno.EINVAL, f"len {length:#x} is not a positive multiple of the page")
    if moffset % alignment or foffset % alignment:
        raise _refuse(errno.EINVAL,
                      f"moffset {moffset:#x} / foffset {foffset:#x} not {alignment:#x}-aligned")
    if window_size is not None and (moffset >= window_size or length > window_size - moffset):
        raise _refuse(errno.EINVAL, f"{moffset:#x}+{length:#x} outside the "
                      f"{window_size:#x}-byte window")
    if length > U64_MAX - moffset:
        raise _refuse(errno.EINVAL, f"{moffset:#x}+{length:#x} overflows")
    if foffset > _OFF_T_MAX - length:
        raise _refuse(errno.EINVAL, f"foffset {foffset:#x}+{length:#x} overflows off_t")
    return bool(arg.flags & SetupMappingFlags.WRITE)


class DaxServer:
    """A connection's DAX mappings: validation, bookkeeping, forwarding to a :class:`DaxMapper`.

    One lock serialises map and unmap (a vhost-user round trip each), so two requests can never
    both pass the overlap check for the same range, and a filesystem holds at most one extra
    descriptor at a time for mapping.
    """

    def __init__(self, mapper: DaxMapper, *, alignment: int = PAGE_SIZE,
                 max_mappings: int = 16384) -> None:
        if alignment < PAGE_SIZE or alignment & (alignment - 1) or alignment > 1 << DAX_SHIFT:
            raise LocalProtocolError(f"alignment {alignment} not a power of two in "
                                     f"[{PAGE_SIZE}, 2 MiB]")
        self.mapper = mapper
        self.alignment = alignment
        self.max_mappings = max_mappings
        self._lock = threading.Lock()
        self._starts: list[int] = []  # sorted moffsets, parallel to _maps
        self._maps: list[ServerMapping] = []

    @classmethod
    def from_conn(cls, conn: ConnectionInfo, **kwargs: Any) -> DaxServer | None:
        """The server for a connection whose transport offers a window (``conn.extra["dax"]``),
        else None. Advertises ``map_alignment`` (FUSE_MAP_ALIGNMENT) when the driver offered it;
        call from ``Filesystem.init``."""
        mapper = conn.extra.get(DAX_EXTRA_KEY)
        if mapper is None:
            return None
        if not isinstance(mapper, DaxMapper):
            raise LocalProtocolError(f"conn.extra[{DAX_EXTRA_KEY!r}] is not a DaxMapper")
        if conn.kernel_flags & InitFlags.MAP_ALIGNMENT:
            conn.flags |= InitFlags.MAP_ALIGNMENT
            conn.map_alignment = max(conn.map_alignment, MAP_ALIGNMENT)
        server = cls(mapper, alignment=1 << max(conn.map_alignment, MAP_ALIGNMENT), **kwargs)
        log.info("DAX enabled (window %s)", "size unknown" if mapper.window_size is None
                 else f"{mapper.window_size:#x} bytes")
        return server

    # ------------------------------------------------------------------ introspection

    def mappings(self) -> tuple[ServerMapping, ...]:
        """Live mappings in window order."""
        with self._lock:
            return tuple(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def _overlapping(self, start: int, end: int) -> tuple[int, int]:
        lo = bisect.bisect_right(self._starts, start) - 1
        if lo < 0 or self._maps[lo].end <= start:
            lo += 1
        hi = bisect.bisect_left(self._starts, end, lo)
        return lo, hi

    # ------------------------------------------------------------------ SETUPMAPPING

    def setup(self, nodeid: int, arg: SetupMappingIn,
              open_fd: Callable[[bool], int]) -> ServerMapping:
        """Handle FUSE_SETUPMAPPING for ``nodeid``.

        ``open_fd(writable)`` returns a new descriptor of the file to map (this method closes
        it): opened O_RDWR for a writable mapping, O_RDONLY otherwise, from ``arg.fh`` or, when
        ``arg.fh == FH_NONE``, from the node; it raises ``FuseError`` (EBADF for a closed
        handle, EROFS, EACCES ...). Called only once the arguments passed every check.
        """
        writable = check_setupmapping(arg, window_size=self.mapper.window_size,
                                      alignment=self.alignment)
        moffset, length, foffset = arg.moffset, arg.len, arg.foffset
        end = moffset + length
        with self._lock:
            lo, hi = self._overlapping(moffset, end)
            if lo < hi:
                old = self._maps[lo]
                if hi - lo != 1 or old.moffset != moffset or old.length != length:
                    raise _refuse(errno.EINVAL, f"{moffset:#x}+{length:#x} partially overlaps "
                                  f"the mapping at {old.moffset:#x}+{old.length:#x}")
            elif len(self._maps) >= self.max_mappings:
                raise _refuse(errno.ENOMEM, f"{self.max_mappings} mappings already")
            fd = open_fd(writable)
            try:
                try:
                    st = os.fstat(fd)
                except OSError as e:
                    raise _refuse(errno.EBADF, f"fstat: {e.strerror}") from None
                if not stat.S_ISREG(st.st_mode):
                    raise _refuse(errno.EBADF, "not a regular file")
                if foffset >= st.st_size:
                    raise _refuse(errno.EINVAL, f"foffset {foffset:#x} at or past the end of "
                                  f"the file ({st.st_size:#x} bytes)")
                self.mapper.map(fd, foffset, moffset, length, writable)
            finally:
                os.close(fd)
            new = ServerMapping(moffset, length, foffset, writable, nodeid)
            self._maps[lo:hi] = [new]
            self._starts[lo:hi] = [moffset]
            return new

    # ------------------------------------------------------------------ REMOVEMAPPING

    def remove(self, nodeid: int, items: Sequence[RemoveMappingOne]) -> list[ServerMapping]:
        """Handle FUSE_REMOVEMAPPING for ``nodeid``; returns what was removed."""
        count = len(items)
        if not 1 <= count <= REMOVEMAPPING_MAX_ENTRY:
            raise _refuse(errno.EINVAL, f"REMOVEMAPPING with {count} entries")
        for it in items:
            if type(it.moffset) is not int or type(it.len) is not int:
                raise _refuse(errno.EINVAL, "REMOVEMAPPING entry is not two integers")
        if any(it.len == U64_MAX for it in items):
            if count != 1:
                raise _refuse(errno.EINVAL, "the remove-all length must be the only entry")
            return self.remove_all(strict=True)
        with self._lock:
            picked: dict[int, int] = {}  # index in _maps -> entry number
            for n, it in enumerate(items):
                i = bisect.bisect_left(self._starts, it.moffset)
                m = self._maps[i] if i < len(self._maps) else None
                if m is None or m.moffset != it.moffset or m.length != it.len:
                    raise _refuse(errno.EINVAL, f"entry {n} ({it.moffset:#x}+{it.len:#x}) does "
                                  "not name a mapping")
                if m.nodeid != nodeid:
                    raise _refuse(errno.EINVAL, f"entry {n} names a mapping of node "
                                  f"{m.nodeid}, not {nodeid}")
                if i in picked:
                    raise _refuse(errno.EINVAL, f"entries {picked[i]} and {n} are the same")
                picked[i] = n
            removed: list[ServerMapping] = []
            try:
                for i in sorted(picked):
                    m = self._maps[i]
                    self.mapper.unmap(m.moffset, m.length)
                    removed.append(m)
            finally:
                if removed:
                    gone = {m.moffset for m in removed}
                    self._maps = [m for m in self._maps if m.moffset not in gone]
                    self._starts = [m.moffset for m in self._maps]
            return removed

    def remove_all(self, *, strict: bool = False) -> list[ServerMapping]:
        """Remove every mapping (a device reset, DESTROY, or the remove-all length).

        With ``strict`` a refusal of the mapper is raised; otherwise it is logged (the
        connection is going away) and the table is cleared anyway.
        """
        with self._lock:
            removed, self._maps, self._starts = self._maps, [], []
            if not removed and not strict:
                return []
            try:
                self.mapper.unmap(0, U64_MAX)
            except FuseError as e:
                if strict:
                    self._maps, self._starts = removed, [m.moffset for m in removed]
                    raise
                # The transport usually went first (its channel is closed): the front-end
                # drops every mapping at a device reset anyway (SPEC 3.5).
                log.info("DAX: could not remove the window's mappings: %s", e)
            return removed
