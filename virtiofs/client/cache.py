"""Client-side caches: inodes with their attributes, directory entries, file data.

The kernel keeps three caches for a FUSE mount and so does our client: the dcache (name ->
nodeid, valid for ``entry_valid``), the inode attributes (valid for ``attr_valid``) and the page
cache (file data, kept while the file is open in ``auto`` mode — close-to-open consistency —
and across opens in ``always`` mode).  Every LOOKUP-like reply that names a nodeid gives the
client one lookup reference on it, which it must give back with FORGET when it drops the inode
(fs/fuse/inode.c ``fuse_evict_inode`` → ``fuse_queue_forget``).

Nothing here talks to the server: :class:`~virtiofs.client.client.Client` owns the policy.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field

from ..protocol.structs import Attr

__all__ = ["DataCache", "Inode", "expiry", "attr_type"]

_MAX_TIMEOUT = 1 << 31
"""Clamp for absurd timeouts (u64 seconds from a peer): about 68 years."""


def expiry(sec: int, nsec: int, now: float | None = None) -> float:
    """Monotonic deadline of a ``(entry|attr)_valid`` pair; 0.0 when it is already stale.

    The kernel treats ``0, 0`` as "expired at once" (``fuse_time_to_jiffies``); nanoseconds past
    one second are clamped as the kernel does (``min(nsec, 999999999)``).
    """
    if not sec and not nsec:
        return 0.0
    base = time.monotonic() if now is None else now
    return base + min(sec, _MAX_TIMEOUT) + min(nsec, 999_999_999) / 1e9


def attr_type(attr: Attr) -> int:
    """The S_IFMT bits of an attribute's mode."""
    return stat.S_IFMT(attr.mode)


@dataclass(eq=False)
class DataCache:
    """Cached file contents in fixed-size blocks (the client's page cache for one inode).

    ``stamp`` is ``(mtime, mtimensec, size)`` of the attributes the data was read under; when a
    later GETATTR shows another stamp the cache is dropped (FUSE_AUTO_INVAL_DATA behaviour).
    """

    block: int
    blocks: dict[int, bytes] = field(default_factory=dict)
    stamp: tuple[int, int, int] | None = None

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.blocks.values())

    def clear(self) -> None:
        self.blocks.clear()
        self.stamp = None

    def drop_range(self, start: int, end: int) -> None:
        """Forget every block that overlaps ``[start, end)`` (a write or truncate touched it)."""
        if end <= start or not self.blocks:
            return
        first, last = start // self.block, (end - 1) // self.block
        if last - first > len(self.blocks):
            for idx in [i for i in self.blocks if first <= i <= last]:
                del self.blocks[idx]
        else:
            for idx in range(first, last + 1):
                self.blocks.pop(idx, None)

    def truncate(self, size: int) -> None:
        """Drop data at and after ``size`` (the block holding ``size`` included)."""
        cut = size // self.block
        for idx in [i for i in self.blocks if i >= cut]:
            del self.blocks[idx]


@dataclass(eq=False)
class DirtyData:
    """Writes held back in writeback mode, as sorted non-overlapping ``[offset, bytearray]``."""

    extents: list[tuple[int, bytearray]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for _, b in self.extents)

    @property
    def end(self) -> int:
        return max((o + len(b) for o, b in self.extents), default=0)

    def add(self, offset: int, data: bytes | memoryview) -> None:
        """Merge one write; later bytes win where they overlap earlier ones."""
        new_start, new_end = offset, offset + len(data)
        keep: list[tuple[int, bytearray]] = []
        merged = bytearray(data)
        start, end = new_start, new_end
        for o, b in self.extents:
            e = o + len(b)
            if e < new_start or o > new_end:
                keep.append((o, b))
                continue
            # Overlapping or adjacent: combine into one extent around the new bytes.
            if o < start:
                merged[0:0] = b[: start - o]
                start = o
            if e > end:
                merged += b[end - o:]
                end = e
        keep.append((start, merged))
        keep.sort(key=lambda x: x[0])
        self.extents = keep

    def truncate(self, size: int) -> None:
        out: list[tuple[int, bytearray]] = []
        for o, b in self.extents:
            if o >= size:
                continue
            if o + len(b) > size:
                del b[size - o:]
            out.append((o, b))
        self.extents = out

    def take(self) -> list[tuple[int, bytearray]]:
        ext, self.extents = self.extents, []
        return ext


@dataclass(eq=False)
class Inode:
    """What the client knows of one nodeid."""

    nodeid: int
    generation: int = 0
    nlookup: int = 0
    """Lookup references the server gave us and we have not forgotten."""
    attr: Attr | None = None
    attr_expiry: float = 0.0
    attr_stale: bool = False
    """Set when this client changed the inode: the attributes must be asked again, even in
    ``always`` mode (the file type stays known)."""
    opens: int = 0
    """Open file handles on this inode: it cannot be evicted while any is open."""
    data: DataCache | None = None
    dirty: DirtyData | None = None
    dirty_fh: int | None = None
    """The handle the dirty data will be written through."""
    link: bytes | None = None
    """Cached READLINK answer (FUSE_CACHE_SYMLINKS)."""
    names: set[tuple[int, bytes]] = field(default_factory=set)
    """Entry-cache keys pointing at this inode (removed with it)."""
    bad: bool = False
    """The server changed the file type under a nodeid (the kernel's ``fuse_make_bad``)."""

    @property
    def type(self) -> int:
        return attr_type(self.attr) if self.attr is not None else 0
