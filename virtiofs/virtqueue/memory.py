"""Guest memory: the only way queue code reaches shared memory.

A :class:`GuestMemory` is a set of non-overlapping :class:`MemoryRegion` objects, each a
``MAP_SHARED`` mapping of a file descriptor (a memfd in practice) at an offset, placed at a guest
physical address (gpa). vhost-user front-ends also give each region the address at which they
mapped it themselves (``uaddr``); vring addresses in ``SET_VRING_ADDR`` are in that space, hence
:meth:`GuestMemory.uaddr_to_gpa`.

Every access is range-checked as a whole before any byte is touched: Firecracker CVE-2019-18960
and cloud-hypervisor#2450 were off-by-ones at the end of a region. Addresses are u64 in the
virtio rings, so ``gpa + length`` past 2**64 is refused as the wrap-around it would be in C.

:class:`GuestAllocator` is a small first-fit allocator over a gpa range, used by the driver role
to place rings and the buffers it lends to the device.
"""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os
import stat
from collections.abc import Iterable
from typing import NamedTuple

from virtiofs.errors import GuestMemoryError, LocalProtocolError

__all__ = ["Buffer", "GuestAllocator", "GuestMemory", "MemoryRegion"]

_U64_LIMIT = 1 << 64
_PAGE = mmap.PAGESIZE
_NO_REGION: tuple[int, int, memoryview] = (0, 0, memoryview(b""))


class Buffer(NamedTuple):
    """A guest-physical byte range ``[addr, addr + length)`` owned by the caller."""

    addr: int
    length: int


class MemoryRegion:
    """One mapped region of guest memory.

    ``view`` is a writable memoryview of exactly ``size`` bytes; ``fd`` is a descriptor of the
    backing file owned by the region (closed by :meth:`GuestMemory.close`), kept so that it can be
    handed to another process (``SCM_RIGHTS``, ``pass_fds``) together with ``mmap_offset``.
    """

    __slots__ = ("gpa", "size", "end", "fd", "mmap_offset", "uaddr", "view", "_mmap", "_base")

    def __init__(
        self, gpa: int, size: int, fd: int, mmap_offset: int, uaddr: int | None, mm: mmap.mmap,
        page_delta: int,
    ) -> None:
        self.gpa = gpa
        self.size = size
        self.end = gpa + size
        self.fd = fd
        self.mmap_offset = mmap_offset
        self.uaddr = uaddr
        self._mmap = mm
        self._base = memoryview(mm)
        self.view = self._base[page_delta:page_delta + size]

    def __repr__(self) -> str:
        ua = "" if self.uaddr is None else f", uaddr={self.uaddr:#x}"
        return f"MemoryRegion(gpa={self.gpa:#x}, size={self.size:#x}, fd={self.fd}{ua})"

    def _close(self) -> None:
        self.view.release()
        self._base.release()
        try:
            self._mmap.close()
        except BufferError:
            # Descriptor chains still hold views into the mapping (e.g. a request in flight when
            # a vhost-user REM_MEM_REG arrives). The mapping then lives until the last view is
            # dropped; it stays valid memory, so nothing can fault.
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _check_u64_range(what: str, start: int, length: int) -> None:
    if start < 0 or length < 0 or start + length > _U64_LIMIT:
        raise GuestMemoryError(f"{what} [{start:#x}, +{length:#x}) overflows the u64 address space")


class GuestMemory:
    """Guest memory as a set of shared mappings, with overflow-checked translation.

    Typical uses::

        mem = GuestMemory.allocate(1 << 20)          # one memfd-backed region at gpa 0
        mem.fd                                       # pass it to another process
        peer = GuestMemory.from_fd(fd, 1 << 20)      # the other side maps the same pages

        mem = GuestMemory()                          # vhost-user SET_MEM_TABLE / ADD_MEM_REG
        mem.add_region(gpa, size, fd, mmap_offset, uaddr=qemu_va)

    Not thread-safe for region changes; translation from several threads is fine as long as
    regions are not added or removed concurrently (vhost-user stops rings first).
    """

    def __init__(self) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        # (gpa, size, view) of the region the last translation hit: nearly every translation
        # hits the same region (one RAM region for a local guest, the big RAM region for QEMU),
        # so the hot paths (here and in the queues' descriptor walks) try it first.
        self._hot: tuple[int, int, memoryview] = _NO_REGION

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def allocate(cls, size: int, *, gpa: int = 0, name: str = "virtiofs-guest") -> GuestMemory:
        """Create memory with one fresh memfd-backed region of ``size`` bytes at ``gpa``."""
        mem = cls()
        mem.allocate_region(gpa, size, name=name)
        return mem

    @classmethod
    def from_fd(
        cls, fd: int, size: int, *, gpa: int = 0, mmap_offset: int = 0, uaddr: int | None = None
    ) -> GuestMemory:
        """Map ``size`` bytes of ``fd`` at ``mmap_offset`` as one region at ``gpa``.

        The caller keeps ownership of ``fd`` (the region holds a duplicate).
        """
        mem = cls()
        mem.add_region(gpa, size, fd, mmap_offset, uaddr)
        return mem

    def allocate_region(self, gpa: int, size: int, *, name: str = "virtiofs-guest") -> MemoryRegion:
        """Add a fresh memfd-backed region (zero-filled) at ``gpa``.

        The memfd is sealed against shrinking: a peer that shares it cannot truncate it under
        our mapping (which would turn accesses into SIGBUS).
        """
        if size <= 0:
            raise LocalProtocolError(f"region size must be positive, not {size}")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            return self.add_region(gpa, size, fd)
        finally:
            os.close(fd)

    def add_region(
        self, gpa: int, size: int, fd: int, mmap_offset: int = 0, uaddr: int | None = None
    ) -> MemoryRegion:
        """Map ``fd`` at ``mmap_offset`` for ``size`` bytes as guest memory at ``gpa``.

        The values usually come from a peer (vhost-user memory table), so they are checked as
        such: non-empty, no u64 overflow of gpa/uaddr/offset + size, no overlap with an existing
        region, and the file (when it is a regular file or memfd) at least ``mmap_offset + size``
        long — mapping past the end of a file would fault on first touch.
        Raises :class:`GuestMemoryError`. The region owns a duplicate of ``fd``.
        """
        if size <= 0:
            raise GuestMemoryError(f"memory region of size {size}")
        _check_u64_range("region gpa", gpa, size)
        _check_u64_range("region mmap_offset", mmap_offset, size)
        if uaddr is not None:
            _check_u64_range("region uaddr", uaddr, size)
        i = bisect.bisect_right(self._starts, gpa)
        if i > 0 and self._regions[i - 1].end > gpa:
            raise GuestMemoryError(f"region at {gpa:#x} overlaps {self._regions[i - 1]!r}")
        if i < len(self._regions) and self._regions[i].gpa < gpa + size:
            raise GuestMemoryError(f"region at {gpa:#x} overlaps {self._regions[i]!r}")
        if uaddr is not None:
            for r in self._regions:
                if r.uaddr is not None and r.uaddr < uaddr + size and uaddr < r.uaddr + r.size:
                    raise GuestMemoryError(f"region uaddr {uaddr:#x} overlaps {r!r}")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise GuestMemoryError(f"memory region fd {fd}: {e}") from None
        if stat.S_ISREG(st.st_mode) and st.st_size < mmap_offset + size:
            raise GuestMemoryError(
                f"memory region fd is {st.st_size:#x} bytes, region needs {mmap_offset + size:#x}"
            )
        # mmap(2) wants a page-aligned offset; QEMU's offsets are, but libvhost-user maps from 0
        # and adds the offset, so accept any offset the same way.
        delta = mmap_offset % _PAGE
        try:
            mm = mmap.mmap(
                fd, size + delta, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=mmap_offset - delta,
            )
        except (OSError, ValueError, OverflowError) as e:
            raise GuestMemoryError(f"cannot map memory region: {e}") from None
        own_fd = os.dup(fd)
        region = MemoryRegion(gpa, size, own_fd, mmap_offset, uaddr, mm, delta)
        self._regions.insert(i, region)
        self._starts.insert(i, gpa)
        if not self._hot[1]:
            self._hot = (gpa, size, region.view)
        return region

    def remove_region(self, gpa: int, size: int | None = None) -> None:
        """Unmap the region starting at ``gpa`` (and of ``size`` bytes, when given).

        vhost-user ``REM_MEM_REG`` names the region by its gpa and size.
        """
        i = bisect.bisect_left(self._starts, gpa)
        if i == len(self._regions) or self._regions[i].gpa != gpa or (
            size is not None and self._regions[i].size != size
        ):
            raise GuestMemoryError(f"no memory region at {gpa:#x}")
        region = self._regions.pop(i)
        del self._starts[i]
        if self._hot[2] is region.view:
            r0 = self._regions[0] if self._regions else None
            self._hot = (r0.gpa, r0.size, r0.view) if r0 is not None else _NO_REGION
        region._close()

    def close(self) -> None:
        """Unmap every region and close their fds."""
        regions, self._regions, self._starts, self._hot = self._regions, [], [], _NO_REGION
        for r in regions:
            r._close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inspection -------------------------------------------------------------------------

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The regions, sorted by gpa."""
        return tuple(self._regions)

    @property
    def fd(self) -> int:
        """The fd of the only (or first) region: what to pass to a peer process."""
        if not self._regions:
            raise LocalProtocolError("guest memory has no region")
        return self._regions[0].fd

    @property
    def size(self) -> int:
        """Total mapped bytes."""
        return sum(r.size for r in self._regions)

    def __repr__(self) -> str:
        return f"GuestMemory({self._regions!r})"

    # -- translation ------------------------------------------------------------------------

    def _region_at(self, gpa: int) -> MemoryRegion | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            if gpa < r.end:
                return r
        return None

    def translate(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``[gpa, gpa + length)``, which must lie inside one region.

        A zero-length range is accepted anywhere inside a region or at its end.
        Raises :class:`GuestMemoryError` otherwise (never a partial view).
        """
        base, size, view = self._hot
        off = gpa - base
        if 0 <= off <= off + length <= size:
            return view[off:off + length]
        return self._translate_slow(gpa, length)

    def _translate_slow(self, gpa: int, length: int) -> memoryview:
        _check_u64_range("guest range", gpa, length)
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            off = gpa - r.gpa
            if off + length <= r.size:
                self._hot = (r.gpa, r.size, r.view)
                return r.view[off:off + length]
        raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) is not inside one region")

    def translate_sg(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering ``[gpa, gpa + length)``, split where it crosses into an adjacent region.

        Regions must be contiguous in gpa space across the whole range (go-fuse
        ``readVringEntry``); a hole anywhere raises :class:`GuestMemoryError`. A zero-length
        range gives ``[]`` without any check.
        """
        if length == 0:
            return []
        base, size, view = self._hot
        off = gpa - base
        if 0 <= off <= off + length <= size:
            return [view[off:off + length]]
        _check_u64_range("guest range", gpa, length)
        views: list[memoryview] = []
        cur, left = gpa, length
        i = bisect.bisect_right(self._starts, gpa) - 1
        while left:
            if i < 0 or i >= len(self._regions):
                break
            r = self._regions[i]
            if not r.gpa <= cur < r.end:
                break
            off = cur - r.gpa
            n = min(left, r.size - off)
            if not views:
                self._hot = (r.gpa, r.size, r.view)
            views.append(r.view[off:off + n])
            cur += n
            left -= n
            i += 1
        if left:
            raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) leaves guest memory")
        return views

    def check_range(self, gpa: int, length: int) -> bool:
        """Whether ``[gpa, gpa + length)`` is entirely backed by (adjacent) regions."""
        try:
            self.translate_sg(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def uaddr_to_gpa(self, uaddr: int, length: int = 1) -> int:
        """Translate a front-end virtual address (vhost-user vring address) to a gpa.

        ``[uaddr, uaddr + length)`` must lie inside one region's user range.
        """
        _check_u64_range("user range", uaddr, length)
        for r in self._regions:
            if r.uaddr is not None and r.uaddr <= uaddr and uaddr + length <= r.uaddr + r.size:
                return r.gpa + (uaddr - r.uaddr)
        raise GuestMemoryError(f"user address {uaddr:#x} (+{length:#x}) is in no memory region")

    def read(self, gpa: int, n: int) -> bytes:
        """Copy ``n`` bytes out of guest memory (may cross adjacent regions)."""
        views = self.translate_sg(gpa, n)
        if len(views) == 1:
            return bytes(views[0])
        return b"".join(views)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``gpa`` (may cross adjacent regions)."""
        src = memoryview(data).cast("B")
        pos = 0
        for v in self.translate_sg(gpa, len(src)):
            n = len(v)
            v[:] = src[pos:pos + n]
            pos += n

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        """Set ``length`` bytes at ``gpa`` to ``byte`` (zeroing rings before use)."""
        chunk = bytes([byte]) * min(length, 1 << 16)
        for v in self.translate_sg(gpa, length):
            for off in range(0, len(v), len(chunk)):
                n = min(len(chunk), len(v) - off)
                v[off:off + n] = chunk[:n]


class GuestAllocator:
    """First-fit allocator over ``[base, base + size)`` of guest memory, for the driver role.

    The driver places its rings, indirect tables and the buffers it lends to the device here.
    Freed blocks are coalesced. Not thread-safe.
    """

    def __init__(self, mem: GuestMemory, base: int, size: int) -> None:
        if not mem.check_range(base, size):
            raise LocalProtocolError(f"allocator range [{base:#x}, +{size:#x}) not in memory")
        self.mem = mem
        self.base = base
        self.size = size
        self._free: list[tuple[int, int]] = [(base, size)]  # sorted (addr, length)
        self._used: dict[int, int] = {}

    def alloc(self, length: int, align: int = 16) -> int:
        """Reserve ``length`` bytes aligned to ``align`` (a power of 2); returns the gpa.

        Raises :class:`LocalProtocolError` when no free block is large enough.
        """
        if length <= 0 or align <= 0 or align & (align - 1):
            raise LocalProtocolError(f"bad allocation length {length} / align {align}")
        for i, (start, n) in enumerate(self._free):
            addr = (start + align - 1) & ~(align - 1)
            pad = addr - start
            if pad + length <= n:
                tail = n - pad - length
                repl = []
                if pad:
                    repl.append((start, pad))
                if tail:
                    repl.append((addr + length, tail))
                self._free[i:i + 1] = repl
                self._used[addr] = length
                return addr
        raise LocalProtocolError(f"guest allocator out of space for {length} bytes")

    def free(self, addr: int) -> None:
        """Return a block obtained from :meth:`alloc`."""
        length = self._used.pop(addr, None)
        if length is None:
            raise LocalProtocolError(f"free of {addr:#x}, which is not allocated")
        i = bisect.bisect_left(self._free, (addr, 0))
        start, end = addr, addr + length
        if i < len(self._free) and self._free[i][0] == end:
            end += self._free[i][1]
            del self._free[i]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            start = self._free[i - 1][0]
            del self._free[i - 1]
            i -= 1
        self._free.insert(i, (start, end - start))

    def free_many(self, addrs: Iterable[int]) -> None:
        """Free several blocks."""
        for a in addrs:
            self.free(a)

    @property
    def bytes_free(self) -> int:
        """Bytes not allocated (possibly fragmented)."""
        return sum(n for _, n in self._free)
