"""Driver-side DAX range allocator, after Linux ``fs/fuse/dax.c`` -- sans-I/O.

The driver (our client, like the guest kernel) carves the window into fixed ranges of
``1 << FUSE_DAX_SHIFT`` = 2 MiB at offsets ``i * 2 MiB`` and maps file range ``idx`` (file bytes
``[idx << 21, (idx + 1) << 21)``) of an inode into one of them with FUSE_SETUPMAPPING
(``fh = -1``, ``len = 2 MiB``, flags READ [| WRITE]); it gives ranges back with
FUSE_REMOVEMAPPING, batched up to ``REMOVEMAPPING_MAX_ENTRY`` entries per request, on
inode eviction and by reclaim (SPEC 1.8).

:class:`DaxRangeAllocator` keeps that state and never sends anything: each operation returns
the requests to send (:class:`SetupMapping`, :class:`RemoveMapping`) and the caller does the
I/O, then reports a SETUPMAPPING's outcome with :meth:`DaxRangeAllocator.setup_done`. Every
operation is O(1) (dict, deque, OrderedDict) except victim selection, which skips pinned ranges
(bounded by the number of ranges, as the kernel's busy-list walk), and releasing an inode,
which is linear in the ranges it frees. Not thread-safe: serialise calls (one lock in the
client), as with any sans-I/O state machine.

Differences from the kernel, on purpose:

- Victims are chosen by true LRU over all inodes (every hit moves a range to the back). The
  kernel's inline reclaim prefers the faulting inode's own first range and its background
  worker walks the busy list in allocation order, both to respect its lock ordering
  (``invalidate_lock`` before ``fi->dax->sem``); we have no such constraint.
- Ranges in use are *pinned* (``get_range(..., pin=True)`` then :meth:`unpin`), the
  counterpart of the kernel's ``dmap->refcnt`` taken in ``fuse_fill_iomap``: reclaim skips
  them and releasing an inode with pinned ranges is refused.
- A range whose SETUPMAPPING is in flight is pinned and answers lookups with
  ``GrantKind.BUSY`` (the kernel holds ``fi->dax->sem`` for writing instead).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Final

from virtiofs.errors import LocalProtocolError
from virtiofs.protocol.constants import DAX_SHIFT, REMOVEMAPPING_MAX_ENTRY, SetupMappingFlags

__all__ = [
    "FUSE_DAX_RECLAIM_CHUNK",
    "FUSE_DAX_RECLAIM_THRESHOLD",
    "FUSE_DAX_SHIFT",
    "FUSE_DAX_SZ",
    "FH_NONE",
    "DaxRangeAllocator",
    "GrantKind",
    "RangeGrant",
    "RemoveMapping",
    "SetupMapping",
    "reclaim_count",
    "removemapping_batches",
]

FUSE_DAX_SHIFT: Final = DAX_SHIFT
FUSE_DAX_SZ: Final = 1 << DAX_SHIFT
# The reclaim policy is the driver's own (fs/fuse/dax.c), not part of the protocol.
#: Background reclaim starts when free ranges drop below this percentage of all ranges.
FUSE_DAX_RECLAIM_THRESHOLD: Final = 20
#: Ranges the background reclaimer frees per pass.
FUSE_DAX_RECLAIM_CHUNK: Final = 10
#: ``fh`` the Linux driver sends: all ones, so the server maps by nodeid (FACTS).
FH_NONE: Final = (1 << 64) - 1
_U64_MAX: Final = (1 << 64) - 1
_OFF_T_MAX: Final = (1 << 63) - 1
#: Bookkeeping bound: a 2 TiB window of 2 MiB ranges.
_MAX_RANGES: Final = 1 << 20


def reclaim_count(nr_free: int, nr_ranges: int) -> int:
    """How many ranges a background reclaim pass should free now (0: none).

    ``__kick_dmap_free_worker``: reclaim when ``nr_free < max(nr_ranges * 20 / 100, 1)``, then
    ``FUSE_DAX_RECLAIM_CHUNK`` ranges per pass (``fuse_dax_free_mem_worker``).
    """
    threshold = max(nr_ranges * FUSE_DAX_RECLAIM_THRESHOLD // 100, 1)
    return FUSE_DAX_RECLAIM_CHUNK if nr_free < threshold else 0


@dataclass(frozen=True, slots=True)
class SetupMapping:
    """A FUSE_SETUPMAPPING to send with ``in_header.nodeid = nodeid``."""

    nodeid: int
    foffset: int
    length: int
    moffset: int
    writable: bool
    fh: int = FH_NONE

    @property
    def flags(self) -> SetupMappingFlags:
        """``fuse_setupmapping_in.flags``: READ, plus WRITE for a writable mapping."""
        if self.writable:
            return SetupMappingFlags.READ | SetupMappingFlags.WRITE
        return SetupMappingFlags.READ


@dataclass(frozen=True, slots=True)
class RemoveMapping:
    """One FUSE_REMOVEMAPPING request for ``nodeid``: 1..256 ``(moffset, len)`` entries."""

    nodeid: int
    entries: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        """``fuse_removemapping_in.count``."""
        return len(self.entries)


def removemapping_batches(nodeid: int, entries: Iterable[tuple[int, int]]) -> list[RemoveMapping]:
    """Split ``entries`` into REMOVEMAPPING requests of at most REMOVEMAPPING_MAX_ENTRY."""
    out: list[RemoveMapping] = []
    batch: list[tuple[int, int]] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == REMOVEMAPPING_MAX_ENTRY:
            out.append(RemoveMapping(nodeid, tuple(batch)))
            batch = []
    if batch:
        out.append(RemoveMapping(nodeid, tuple(batch)))
    return out


class GrantKind(Enum):
    """What :meth:`DaxRangeAllocator.get_range` found."""

    HIT = "hit"
    """Mapped with the access asked for: use the window now."""
    NEW = "new"
    """A range was allocated: send ``remove`` (if any), then ``setup``, then ``setup_done``."""
    UPGRADE = "upgrade"
    """Mapped read-only, write asked: send ``setup`` (WRITE), then ``setup_done``."""
    BUSY = "busy"
    """A SETUPMAPPING for this file range is in flight: wait for it and ask again."""


@dataclass(frozen=True, slots=True)
class RangeGrant:
    """The answer of :meth:`DaxRangeAllocator.get_range`."""

    kind: GrantKind
    nodeid: int
    index: int
    """File range index (``foffset >> range_shift``)."""
    moffset: int
    """Window offset of the range."""
    writable: bool
    """Whether the range is (or, once ``setup`` succeeds, will be) mapped writable."""
    generation: int
    """Ties the grant to one use of the range, so stale grants are recognised."""
    pinned: bool
    """The caller holds a pin and must :meth:`~DaxRangeAllocator.unpin` it."""
    remove: RemoveMapping | None = None
    """REMOVEMAPPING of the previous owner of the range (a reclaimed victim): send first."""
    setup: SetupMapping | None = None
    """SETUPMAPPING to send (NEW, UPGRADE)."""
    range_size: int = FUSE_DAX_SZ

    def window_offset(self, foffset: int) -> int:
        """Window offset of file byte ``foffset`` (which must lie in this range)."""
        delta = foffset - (self.index * self.range_size)
        if not 0 <= delta < self.range_size:
            raise LocalProtocolError(f"file offset {foffset:#x} is not in range {self.index}")
        return self.moffset + delta


class _State(Enum):
    FREE = 0
    PENDING = 1  # allocated, SETUPMAPPING in flight
    READY = 2


class _Range:
    __slots__ = (
        "index",
        "moffset",
        "owner",
        "writable",
        "state",
        "upgrading",
        "pins",
        "generation",
    )

    def __init__(self, index: int, moffset: int) -> None:
        self.index = index
        self.moffset = moffset
        self.owner: tuple[int, int] | None = None  # (nodeid, file range index)
        self.writable = False
        self.state = _State.FREE
        self.upgrading = False
        self.pins = 0
        self.generation = 0


class DaxRangeAllocator:
    """Window ranges, per-inode mapping tables, LRU reclaim -- the driver's DAX bookkeeping.

    ``window_size`` is the size of the device's shared-memory region 0; the last partial range,
    if any, is not used (``fuse_dax_mem_range_init``). ``range_shift`` is 21 in Linux; smaller
    values (>= 12) exist for tests and must be >= the server's ``map_alignment``.
    """

    def __init__(self, window_size: int, *, range_shift: int = FUSE_DAX_SHIFT) -> None:
        if type(range_shift) is not int or not 12 <= range_shift <= 30:
            raise LocalProtocolError(f"range_shift {range_shift!r} outside 12..30")
        if type(window_size) is not int or window_size < 0:
            raise LocalProtocolError(f"window size {window_size!r} invalid")
        nr = window_size >> range_shift
        if not 1 <= nr <= _MAX_RANGES:
            raise LocalProtocolError(f"window of {window_size:#x} bytes gives {nr} ranges")
        self._shift = range_shift
        self._size = 1 << range_shift
        self._ranges = [_Range(i, i << range_shift) for i in range(nr)]
        self._free: deque[int] = deque(range(nr))  # allocate from the front, free to the back
        self._lru: OrderedDict[int, None] = OrderedDict()  # owned ranges, least recent first
        self._inodes: dict[int, dict[int, int]] = {}  # nodeid -> file index -> range index

    # ------------------------------------------------------------------ introspection

    @property
    def range_size(self) -> int:
        """Bytes per range (2 MiB by default)."""
        return self._size

    @property
    def nr_ranges(self) -> int:
        """Ranges in the window."""
        return len(self._ranges)

    @property
    def nr_free(self) -> int:
        """Ranges owned by no inode."""
        return len(self._free)

    @property
    def nr_busy(self) -> int:
        """Ranges owned by an inode (mapped or being mapped)."""
        return len(self._lru)

    @property
    def reclaim_wanted(self) -> int:
        """:func:`reclaim_count` for the current state."""
        return reclaim_count(len(self._free), len(self._ranges))

    def lookup(self, nodeid: int, foffset: int) -> tuple[int, bool] | None:
        """(window offset of ``foffset``, writable) if mapped and ready; no LRU effect."""
        table = self._inodes.get(nodeid)
        ri = table.get(foffset >> self._shift) if table is not None and foffset >= 0 else None
        if ri is None:
            return None
        r = self._ranges[ri]
        if r.state is not _State.READY:
            return None
        return r.moffset + (foffset & (self._size - 1)), r.writable

    def hit(self, nodeid: int, foffset: int, write: bool = False) -> int | None:
        """The fast path of :meth:`get_range` for a range already mapped: the window offset of
        ``foffset`` when its range is ready (and writable, for ``write``), marked most recently
        used; else None (then call :meth:`get_range`). O(1), allocates nothing.

        No pin is taken: the caller must keep reclaim and release out until it is done with
        the window bytes, by holding the lock that serialises calls to this allocator while
        it copies (reclaim detaches a range under that lock before anything unmaps it).
        """
        table = self._inodes.get(nodeid)
        if table is None:
            return None
        ri = table.get(foffset >> self._shift)
        if ri is None:
            return None
        r = self._ranges[ri]
        if r.state is not _State.READY or (write and not r.writable):
            return None
        self._lru.move_to_end(ri)
        return r.moffset + (foffset & (self._size - 1))

    def inode_ranges(self, nodeid: int) -> dict[int, tuple[int, bool]]:
        """File range index -> (window offset, writable) of the ready ranges of ``nodeid``."""
        out: dict[int, tuple[int, bool]] = {}
        for idx, ri in self._inodes.get(nodeid, {}).items():
            r = self._ranges[ri]
            if r.state is _State.READY:
                out[idx] = (r.moffset, r.writable)
        return out

    def lru_order(self) -> list[tuple[int, int]]:
        """(nodeid, file range index) of owned ranges, least recently used first."""
        return [owner for ri in self._lru if (owner := self._ranges[ri].owner) is not None]

    # ------------------------------------------------------------------ operations

    def get_range(
        self, nodeid: int, foffset: int, write: bool, *, pin: bool = False
    ) -> RangeGrant | None:
        """The range holding file byte ``foffset`` of ``nodeid``, allocating one if needed.

        Returns None when every range is pinned or being set up: the caller waits or falls
        back to FUSE_READ/FUSE_WRITE. With ``pin`` the range cannot be reclaimed until
        :meth:`unpin` (not pinned on BUSY).
        """
        if type(nodeid) is not int or not 1 <= nodeid <= _U64_MAX:
            raise LocalProtocolError(f"nodeid {nodeid!r} invalid")
        if type(foffset) is not int or not 0 <= foffset <= _OFF_T_MAX:
            raise LocalProtocolError(f"file offset {foffset!r} invalid")
        idx = foffset >> self._shift
        table = self._inodes.get(nodeid)
        ri = table.get(idx) if table is not None else None
        if ri is not None:
            r = self._ranges[ri]
            if r.state is _State.PENDING or (write and r.upgrading):
                return self._grant(GrantKind.BUSY, r, False)
            self._lru.move_to_end(ri)
            if write and not r.writable:
                r.upgrading = True
                r.pins += 1  # held by the in-flight SETUPMAPPING, dropped in setup_done
                setup = SetupMapping(nodeid, idx << self._shift, self._size, r.moffset, True)
                return self._grant(GrantKind.UPGRADE, r, pin, setup=setup, writable=True)
            return self._grant(GrantKind.HIT, r, pin)
        remove = None
        if self._free:
            r = self._ranges[self._free.popleft()]
        else:
            victim = self._victim()
            if victim is None:
                return None
            remove = self._detach([victim], free=False)[0]
            r = victim
        r.owner = (nodeid, idx)
        r.state = _State.PENDING
        r.writable = write
        r.pins = 1  # the in-flight SETUPMAPPING
        self._inodes.setdefault(nodeid, {})[idx] = r.index
        self._lru[r.index] = None
        setup = SetupMapping(nodeid, idx << self._shift, self._size, r.moffset, write)
        return self._grant(GrantKind.NEW, r, pin, remove=remove, setup=setup)

    def setup_done(self, grant: RangeGrant, ok: bool) -> None:
        """Report the outcome of the SETUPMAPPING of a NEW or UPGRADE grant.

        On failure a NEW range goes back to the free list (the grant's pin with it) and an
        UPGRADE leaves the range read-only, as ``fuse_setup_new_dax_mapping`` /
        ``fuse_upgrade_dax_mapping`` do.
        """
        r = self._current(grant)
        if grant.kind is GrantKind.NEW and r is not None and r.state is _State.PENDING:
            r.pins -= 1
            if ok:
                r.state = _State.READY
            else:
                self._detach([r])
            return
        if grant.kind is GrantKind.UPGRADE and r is not None and r.upgrading:
            r.pins -= 1
            r.upgrading = False
            if ok:
                r.writable = True
            return
        raise LocalProtocolError(f"no SETUPMAPPING outstanding for {grant}")

    def unpin(self, grant: RangeGrant) -> None:
        """Drop the pin of a ``pin=True`` grant. A grant whose range was freed since (its
        SETUPMAPPING failed) is ignored."""
        if not grant.pinned:
            raise LocalProtocolError("grant is not pinned")
        r = self._current(grant)
        if r is None:
            return
        if r.pins <= 0:
            raise LocalProtocolError("range is not pinned")
        r.pins -= 1

    def reclaim(self, count: int = FUSE_DAX_RECLAIM_CHUNK) -> list[RemoveMapping]:
        """Free up to ``count`` least recently used unpinned ranges; returns what to send.

        The ranges are free as soon as this returns (the kernel, too, frees them whether or not
        REMOVEMAPPING succeeds: ``reclaim_one_dmap_locked`` only warns).
        """
        if type(count) is not int or count < 0:
            raise LocalProtocolError(f"count {count!r} invalid")
        victims: list[_Range] = []
        for ri in self._lru:
            if len(victims) >= count:
                break
            r = self._ranges[ri]
            if r.pins == 0 and r.state is _State.READY:
                victims.append(r)
        return self._group(self._detach(victims))

    def background_reclaim(self) -> list[RemoveMapping]:
        """One pass of the kernel's background reclaimer: :meth:`reclaim` of
        :func:`reclaim_count` ranges (nothing while enough ranges are free)."""
        return self.reclaim(self.reclaim_wanted)

    def release_inode(
        self, nodeid: int, foffset: int = 0, length: int | None = None
    ) -> list[RemoveMapping]:
        """Free the ranges of ``nodeid`` that hold any byte of ``[foffset, foffset+length)``
        (all of them by default: FORGET/eviction, ``fuse_dax_inode_cleanup``).

        Refused (nothing changed) if one of them is pinned or has a SETUPMAPPING in flight.
        """
        if (
            type(foffset) is not int
            or foffset < 0
            or (length is not None and (type(length) is not int or length < 0))
        ):
            raise LocalProtocolError("file range invalid")
        table = self._inodes.get(nodeid)
        if table is None:
            return []
        first = foffset >> self._shift
        if length is None:
            last = None
        elif length == 0:
            return []
        else:
            last = (foffset + length - 1) >> self._shift
        if last is not None and last - first + 1 < len(table):
            idxs = [i for i in range(first, last + 1) if i in table]
        else:
            idxs = [i for i in table if i >= first and (last is None or i <= last)]
        doomed = [self._ranges[table[i]] for i in sorted(idxs)]
        for r in doomed:
            if r.pins:
                raise LocalProtocolError(f"range {r.index} of nodeid {nodeid} is in use")
        return self._group(self._detach(doomed))

    # ------------------------------------------------------------------ internals

    def _grant(
        self,
        kind: GrantKind,
        r: _Range,
        pin: bool,
        *,
        remove: RemoveMapping | None = None,
        setup: SetupMapping | None = None,
        writable: bool | None = None,
    ) -> RangeGrant:
        if pin:
            r.pins += 1
        assert r.owner is not None
        nodeid, idx = r.owner
        return RangeGrant(
            kind,
            nodeid,
            idx,
            r.moffset,
            r.writable if writable is None else writable,
            r.generation,
            pin,
            remove,
            setup,
            self._size,
        )

    def _current(self, grant: RangeGrant) -> _Range | None:
        """The range of ``grant`` if it is still the same use of it."""
        ri = grant.moffset >> self._shift
        if not 0 <= ri < len(self._ranges):
            return None
        r = self._ranges[ri]
        if r.generation != grant.generation or r.owner != (grant.nodeid, grant.index):
            return None
        return r

    def _victim(self) -> _Range | None:
        for ri in self._lru:
            r = self._ranges[ri]
            if r.pins == 0 and r.state is _State.READY:
                return r
        return None

    def _detach(self, ranges: list[_Range], *, free: bool = True) -> list[RemoveMapping]:
        """Take ``ranges`` from their owners and (with ``free``) put them on the free list;
        return one single-entry REMOVEMAPPING per range that was mapped (READY)."""
        out: list[RemoveMapping] = []
        for r in ranges:
            assert r.owner is not None
            nodeid, idx = r.owner
            table = self._inodes[nodeid]
            del table[idx]
            if not table:
                del self._inodes[nodeid]
            del self._lru[r.index]
            if r.state is _State.READY:
                out.append(RemoveMapping(nodeid, ((r.moffset, self._size),)))
            r.owner = None
            r.state = _State.FREE
            r.writable = False
            r.upgrading = False
            r.pins = 0
            r.generation += 1
            if free:
                self._free.append(r.index)
        return out

    @staticmethod
    def _group(removals: list[RemoveMapping]) -> list[RemoveMapping]:
        """Merge single-entry removals into per-nodeid batches of at most 256 entries."""
        per_node: dict[int, list[tuple[int, int]]] = {}
        for rm in removals:
            per_node.setdefault(rm.nodeid, []).extend(rm.entries)
        out: list[RemoveMapping] = []
        for nodeid, entries in per_node.items():
            out.extend(removemapping_batches(nodeid, entries))
        return out
