"""Client-side DAX: file reads and writes served from the window, as Linux ``fs/fuse/dax.c``.

With ``Client(channel, dax=...)`` and a window (the front-end's
:class:`~virtiofs.dax.window.DaxWindow`, or the loopback's own), regular-file data stops
travelling in FUSE_READ/FUSE_WRITE: the file's 2 MiB ranges are mapped into the window once
(FUSE_SETUPMAPPING, ``fh = -1``, READ [| WRITE]) and every later access is a memory copy -- no
request at all, which is the point of DAX ("data without communication"). The bookkeeping is
:class:`~virtiofs.dax.allocator.DaxRangeAllocator` (2 MiB ranges, per-inode tables, LRU
reclaim); this module does its I/O:

- a read or write copies each range's bytes under the allocator's lock, so reclaim cannot
  take the range away mid-copy (the kernel pins with ``dmap->refcnt``; here the GIL serialises
  copies anyway); the first touch of a range sends SETUPMAPPING, a write to a read-only range
  re-sends it with WRITE (the kernel's upgrade); when the window is full the least recently
  used range is reclaimed, with its REMOVEMAPPING sent before the new SETUPMAPPING;
- reads are clamped to the file size the client knows (``cache="always"`` trusts it without
  asking): a ``MAP_SHARED`` page wholly past the end of the file raises SIGBUS, which would kill
  the process, so nothing past ``st_size`` is ever touched (``fuse_fill_iomap`` clamps to
  ``i_size``). Copies use the window's checked accessors, so a range the back-end unmapped
  behind our back (SHMEM_UNMAP without REMOVEMAPPING) is an error and a FUSE fallback, not a
  SIGSEGV. What no check can catch is a file shorter than the size the server reported: a
  file truncated *on the host* behind the client's back, or a server lying about sizes, still
  means SIGBUS on the next access past the new end (QEMU has the same exposure; a
  ``process_vm_readv`` copy would turn it into EFAULT but measured 18 us per 4 KiB here, six
  times the checked copy);
- writes that would extend the file go through FUSE_WRITE (``fuse_dax_direct_write``), so the
  server sets the new size, and so do writes to set-uid/set-gid files (the server's killpriv
  runs on FUSE_WRITE, not on a store into the window);
- when the server cannot map (ENOSYS: no DAX in this filesystem or transport) DAX is turned off
  for the connection; any other refusal, or a window whose every range is being set up, serves that one
  access through the normal path. The kernel fails the I/O instead; falling back keeps the
  client usable against servers with partial support;
- an inode the client forgets (FORGET, eviction, ``drop_caches``) gives its ranges back with
  REMOVEMAPPING first, and :meth:`DaxIO.close` (the client's unmount) removes every mapping.

Durability is FUSE_FSYNC's job as usual: the window's pages are the host file's page cache.
"""

from __future__ import annotations

import collections
import errno as E
import logging
import os
import stat
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..dax.allocator import FUSE_DAX_SHIFT, DaxRangeAllocator, GrantKind, RangeGrant, RemoveMapping
from ..dax.window import DaxWindow
from ..errors import LocalProtocolError, ProtocolError, ReplyError
from ..protocol import Opcode, decode_reply, encode_request_parts
from ..protocol import structs as S
from .channel import OUT_HEADER_SIZE

if TYPE_CHECKING:
    from .client import Client, ClientFile

__all__ = ["DaxIO", "attach_dax"]

log = logging.getLogger("virtiofs.client.dax")

_PRIV_BITS = stat.S_ISUID | stat.S_ISGID
#: Bound on waiting for another thread's SETUPMAPPING of the same range (seconds).
_BUSY_WAIT = 30.0
#: Ranges set up for one access before giving up on the window (other threads reclaiming them).
_MAX_MISSES = 64


def attach_dax(client: Client, dax: object, *,
               range_shift: int = FUSE_DAX_SHIFT) -> DaxIO | None:
    """The :class:`DaxIO` for ``Client(..., dax=dax)``, or None when there is no usable window.

    ``dax`` is a :class:`~virtiofs.dax.window.DaxWindow`, or True to use the channel's
    ``dax_window`` attribute (set by ``QueueChannel.for_driver`` from a front-end with a
    window). Without a window, or one smaller than a range, the client works without DAX, as
    the kernel does when shared-memory region 0 is absent.
    """
    window: Any = dax if isinstance(dax, DaxWindow) else (
        getattr(client.channel, "dax_window", None) if dax is True else None)
    if not isinstance(window, DaxWindow) or window.closed:
        log.info("DAX asked for but no window: FUSE_READ/FUSE_WRITE as usual")
        return None
    if window.size >> range_shift < 1:
        log.warning("DAX window of %#x bytes holds no %#x-byte range: DAX off", window.size,
                    1 << range_shift)
        return None
    if client.conn.map_alignment > range_shift:
        log.warning("server map_alignment %d > range shift %d: DAX off",
                    client.conn.map_alignment, range_shift)
        return None
    return DaxIO(client, window, range_shift=range_shift)


class DaxIO:
    """The DAX data path of one :class:`~virtiofs.client.client.Client` (see the module doc).

    ``stats`` counts ``read_hits``/``write_hits`` (accesses served from the window),
    ``fallbacks`` (served by FUSE_READ/WRITE instead), ``setups``, ``upgrades``, ``removes``
    (REMOVEMAPPING requests), ``reclaims`` (ranges taken from another inode), ``waits`` (for
    another thread's SETUPMAPPING) and ``lost`` (ranges found missing from the window).
    """

    def __init__(self, client: Client, window: DaxWindow, *,
                 range_shift: int = FUSE_DAX_SHIFT) -> None:
        self.client = client
        self.window = window
        self.alloc = DaxRangeAllocator(window.size, range_shift=range_shift)
        self.range_size = self.alloc.range_size
        self.disabled = False
        self.stats: collections.Counter[str] = collections.Counter()
        self._closed = False
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # BUSY waits; the fast path takes _lock

    # ------------------------------------------------------------------ requests

    def _request(self, opcode: Opcode, nodeid: int, arg: Any, items: Sequence[Any] = ()) -> None:
        """One header-only-reply request (SETUPMAPPING, REMOVEMAPPING); OSError on an errno."""
        c = self.client
        parts = encode_request_parts(opcode, next(c._unique), nodeid, arg, items=items,
                                     uid=c.uid, gid=c.gid, pid=c.pid, minor=c.conn.minor,
                                     flags=int(c.conn.flags))
        c.stats[opcode] += 1
        with c.channel.request(parts, OUT_HEADER_SIZE, timeout=c._timeout()) as rb:
            try:
                reply = decode_reply(opcode, rb.view, minor=c.conn.minor)
            except ReplyError:
                raise
            except ProtocolError as e:
                raise ReplyError(e.what, opcode=opcode, field=e.field, offset=e.offset) from None
        if reply.error:
            raise OSError(reply.error, f"{opcode.name}: {os.strerror(reply.error)}")

    def _send_remove(self, rm: RemoveMapping) -> None:
        """REMOVEMAPPING; a refusal is logged, not raised: the range is free on our side
        whatever the answer (``reclaim_one_dmap_locked`` only warns too)."""
        try:
            self._request(Opcode.REMOVEMAPPING, rm.nodeid, S.RemoveMappingIn(rm.count),
                          [S.RemoveMappingOne(m, n) for m, n in rm.entries])
            self.stats["removes"] += 1
        except (OSError, LocalProtocolError) as e:
            log.warning("REMOVEMAPPING of node %d failed: %s", rm.nodeid, e)

    # ------------------------------------------------------------------ ranges

    def _map(self, nodeid: int, pos: int, write: bool) -> bool:
        """Make the range holding file byte ``pos`` mapped (writable for ``write``): True when
        it is (or was meanwhile, by another thread), False to fall back to FUSE."""
        deadline: float | None = None
        while True:
            with self._cond:
                if self.disabled:
                    return False
                g = self.alloc.get_range(nodeid, pos, write)
                if g is not None and g.kind is GrantKind.HIT:
                    return True
                if g is None or g.kind is GrantKind.BUSY:
                    # None: every range has a SETUPMAPPING in flight (the kernel sleeps on
                    # range_waitq); BUSY: this one has. Both end with a setup_done + notify.
                    self.stats["waits"] += 1
                    now = time.monotonic()
                    deadline = deadline or now + _BUSY_WAIT
                    if now >= deadline:
                        return False
                    self._cond.wait(deadline - now)
                    continue
            return self._setup(g)

    def _setup(self, g: RangeGrant) -> bool:
        """Send what a NEW/UPGRADE grant needs, outside the lock (ranges already mapped stay
        usable meanwhile; this one is PENDING/upgrading, so nobody else maps it)."""
        ok = False
        setup = g.setup
        assert setup is not None
        try:
            if g.remove is not None:
                self.stats["reclaims"] += 1
                self._send_remove(g.remove)
            self._request(Opcode.SETUPMAPPING, setup.nodeid,
                          S.SetupMappingIn(setup.fh, setup.foffset, setup.length,
                                           int(setup.flags), setup.moffset))
            ok = True
            self.stats["upgrades" if g.kind is GrantKind.UPGRADE else "setups"] += 1
        except OSError as e:
            if e.errno == E.ENOSYS:
                log.info("server has no SETUPMAPPING: DAX off for this connection")
                self.disabled = True
            else:
                log.debug("SETUPMAPPING of node %d range %d refused: %s", g.nodeid, g.index, e)
        finally:
            with self._cond:
                self.alloc.setup_done(g, ok)
                self._cond.notify_all()
        return ok

    def _copy(self, nodeid: int, start: int, end: int, buf: memoryview, write: bool) -> bool:
        """Copy file bytes ``[start, end)`` between ``buf`` and the window; False if a range
        could not be had (nothing is promised about ``buf`` then).

        Each range's bytes are copied while holding the allocator lock: reclaim and release
        detach a range under that lock before its REMOVEMAPPING is sent, so a range found
        ready here stays mapped as far as we are concerned (the GIL serialises the copies
        anyway, so the lock costs no parallelism; SETUPMAPPING round trips happen outside it).
        The copy itself goes through the window's checked accessors, under the window's own
        lock: a back-end that unmaps a range behind our back (a hostile SHMEM_UNMAP) makes the
        check fail -- this access then falls back to FUSE -- instead of a SIGSEGV.
        """
        rs = self.range_size
        hit = self.alloc.hit
        lock = self._lock  # the bare lock: Condition.__enter__ is a Python-level call
        window = self.window
        pos, done = start, 0
        misses = 0
        while pos < end:
            with lock:
                if self.disabled:
                    return False
                moff = hit(nodeid, pos, write)
                if moff is not None:
                    n = min(end, (pos // rs + 1) * rs) - pos
                    try:
                        if write:
                            window.write(moff, buf[done:done + n])
                        else:
                            window.readinto(moff, buf[done:done + n])
                    except LocalProtocolError as e:
                        self._lost(nodeid, pos, e)
                        return False
                    pos += n
                    done += n
                    continue
            # Bounded: another thread may reclaim the range between our SETUPMAPPING and the
            # next look, but not forever.
            misses += 1
            if misses > _MAX_MISSES or not self._map(nodeid, pos, write):
                return False
        return True

    def _lost(self, nodeid: int, pos: int, err: Exception) -> None:
        """The window no longer has (or never had) what the allocator believes mapped: forget
        the range (with the lock held), so the next access sets it up again."""
        self.stats["lost"] += 1
        log.warning("DAX range of node %d at %#x is not in the window (%s): dropped", nodeid,
                    pos, err)
        try:
            removals = self.alloc.release_inode(nodeid, pos, 1)
        except LocalProtocolError:
            return
        for rm in removals:
            self._send_remove(rm)

    # ------------------------------------------------------------------ data path

    def read(self, f: ClientFile, dest: memoryview, offset: int) -> int | None:
        """Fill ``dest`` from ``offset`` through the window; the byte count (short only at end
        of file) or None to use FUSE_READ instead."""
        ino = f.ino
        if self.disabled or ino.type != stat.S_IFREG:
            return None
        size = self.client._getattr(ino, f.fh, f.name).size
        if offset >= size:
            return 0
        end = min(size, offset + len(dest))  # never past EOF: SIGBUS (module doc)
        if not self._copy(ino.nodeid, offset, end, dest, False):
            self.stats["fallbacks"] += 1
            return None
        self.stats["read_hits"] += 1
        return end - offset

    def write(self, f: ClientFile, data: memoryview, offset: int) -> int | None:
        """Write ``data`` at ``offset`` through the window; its length, or None to use
        FUSE_WRITE (extending writes, set-id files, no range)."""
        ino = f.ino
        if self.disabled or ino.type != stat.S_IFREG or not len(data):
            return None
        attr = self.client._getattr(ino, f.fh, f.name)
        end = offset + len(data)
        if end > attr.size or attr.mode & _PRIV_BITS:
            return None
        if not self._copy(ino.nodeid, offset, end, data, True):
            self.stats["fallbacks"] += 1
            return None
        self.stats["write_hits"] += 1
        self._drop_cached(f, offset, end)
        return len(data)

    def _drop_cached(self, f: ClientFile, start: int, end: int) -> None:
        """Forget page-cache blocks a window write made stale (a fallback read may have
        filled them)."""
        c, ino = self.client, f.ino
        if ino.data is None:
            return
        with c._lock:
            if ino.data is not None:
                before = ino.data.nbytes
                ino.data.drop_range(start, end)
                c._cached_data -= before - ino.data.nbytes

    # ------------------------------------------------------------------ lifetime

    def forget(self, nodeid: int) -> None:
        """The client drops ``nodeid``: REMOVEMAPPING of its ranges, before its FORGET.

        Sent while holding the DAX lock, so no other thread can map a freed range before the
        server has let go of it.
        """
        with self._cond:
            try:
                removals = self.alloc.release_inode(nodeid)
            except LocalProtocolError as e:  # a SETUPMAPPING in flight: reclaim takes it later
                log.debug("node %d keeps its DAX ranges: %s", nodeid, e)
                return
            for rm in removals:
                self._send_remove(rm)

    def close(self) -> None:
        """Remove every mapping (the client's unmount) and stop using the window."""
        with self._cond:
            if self._closed:
                return
            self._closed = self.disabled = True
            for nodeid in sorted({n for n, _ in self.alloc.lru_order()}):
                try:
                    removals = self.alloc.release_inode(nodeid)
                except LocalProtocolError as e:
                    log.warning("node %d: DAX ranges still in use at close: %s", nodeid, e)
                    continue
                for rm in removals:
                    self._send_remove(rm)
