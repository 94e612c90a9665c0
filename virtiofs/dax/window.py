"""The DAX cache window, device (front-end) side: file ranges mapped into one reserved region.

A virtio-fs device exposes shared-memory region 0 (``VIRTIO_FS_SHMCAP_ID_CACHE``) to the
driver; FUSE_SETUPMAPPING asks the device to map ``len`` bytes of a file at ``foffset`` to
``moffset`` in that region, FUSE_REMOVEMAPPING to take them away (SPEC 1.8, 2.1). Over
vhost-user the back-end owns the files and the front-end (QEMU, cloud-hypervisor, our
front-end) owns the region, so the back-end sends SHMEM_MAP (fd + offsets) / SHMEM_UNMAP on its
back-end channel and the front-end performs the mmap (SPEC 3.5). :class:`DaxWindow` is that
front-end half.

Where the window lives
    A file mapping made with ``MAP_FIXED`` inside a region is a property of the *process* that
    made it: another process mapping the same placeholder (a memfd, say) sees its own pages,
    never our file pages. So the window cannot be shared by mapping it twice. It lives in the
    front-end process, which is also where our driver-side client runs (it reads and writes the
    window directly, as a guest does through the PCI BAR); the back-end only ever sends map and
    unmap requests with the file descriptor attached. Nothing here has a ``fileno``: the window
    is memory owned by this process.

Memory layout
    The whole window is reserved at construction as an inaccessible placeholder (``PROT_NONE``,
    ``MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE``): no RAM, no swap reservation, and a fault on any
    access. :meth:`DaxWindow.map` replaces a range with ``mmap(addr, len, prot,
    MAP_SHARED|MAP_FIXED, fd, foffset)``; :meth:`DaxWindow.unmap` puts the placeholder back with
    another ``MAP_FIXED`` mmap. We never ``munmap`` a sub-range: ``MAP_FIXED`` replaces
    atomically under the mm lock, whereas ``munmap`` would leave a hole that any other mmap in
    the process (malloc, a thread stack) could take, after which the window would alias
    unrelated memory.

Overlap rules (choose with ``overlap=``)
    ``OverlapPolicy.EXACT`` (default), the vhost-user SHMEM_MAP/UNMAP contract, made usable
    for the Linux driver: a map whose range equals an existing mapping exactly *replaces* it
    (the kernel upgrades a read-only range by re-sending SETUPMAPPING with WRITE for the same
    moffset/len, fs/fuse/dax.c ``fuse_upgrade_dax_mapping``); any other overlap is EINVAL; an
    unmap must name one entire existing mapping. ``OverlapPolicy.SPLIT`` is the virtio spec's
    device text ("exact overlap replaces, partial overlap splits"): a map replaces whatever it
    overlaps, trimming neighbours; an unmap removes whatever lies in its range (nothing there is
    not an error, like munmap). An unmap with ``len == 2**64 - 1`` removes everything in either
    mode (cloud-hypervisor ``fs_slave_unmap``).

Access from Python
    :attr:`DaxWindow.view` is a writable memoryview over the whole window (the fast path: the
    client copies straight out of it); :meth:`read`, :meth:`readinto` and :meth:`write` check
    first that the range is mapped. Touching an unmapped page raises SIGSEGV, and touching a
    mapped page past the end of its file raises SIGBUS -- both kill the interpreter, so the
    caller must bound accesses by the file size, as the kernel does (``fuse_fill_iomap`` clamps
    to ``i_size``), and must not unmap a range another thread is reading.

The views keep the reservation alive: :meth:`close` always removes every file mapping at once,
and releases the address range as soon as no view is left (SECURITY B6 #18: no Python object
is kept alive only by a raw address).
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import os
import platform
import stat
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from cffi import FFI

from virtiofs.errors import DaxMappingError, LocalProtocolError

__all__ = [
    "PAGE_SIZE",
    "U64_MAX",
    "DaxMapping",
    "DaxWindow",
    "OverlapPolicy",
]

PAGE_SIZE: Final = mmap.PAGESIZE
#: ``len`` of an unmap that means "the whole window" (cloud-hypervisor ``fs_slave_unmap``).
U64_MAX: Final = (1 << 64) - 1
#: Largest ``foffset + len`` mmap accepts: off_t is signed 64-bit (the kernel answers
#: EOVERFLOW past it; we answer EINVAL before calling).
_OFF_T_MAX: Final = (1 << 63) - 1
#: Reservation limit: x86-64 user space is 128 TiB; a window is normally a few GiB.
_MAX_WINDOW: Final = 1 << 46

# Linux mmap flag values. MAP_FIXED/MAP_NORESERVE are not in Python 3.11's mmap module; the
# values below are those of x86-64, arm64 and riscv64 (asm-generic/mman*.h) and differ on
# mips/ppc/sparc, so refuse to guess elsewhere.
if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64", "riscv64"):
    raise ImportError("virtiofs.dax.window supports Linux on x86_64/aarch64/riscv64 only")
_PROT_NONE: Final = 0
_PROT_READ: Final = mmap.PROT_READ
_PROT_WRITE: Final = mmap.PROT_WRITE
_MAP_SHARED: Final = mmap.MAP_SHARED
_MAP_PRIVATE: Final = mmap.MAP_PRIVATE
_MAP_ANONYMOUS: Final = mmap.MAP_ANONYMOUS
_MAP_FIXED: Final = 0x10
_MAP_NORESERVE: Final = 0x4000
_PLACEHOLDER_FLAGS: Final = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE

_ffi = FFI()
# ABI mode: no compiler. off_t is ``long`` on LP64 Linux (glibc's mmap is mmap64 there).
_ffi.cdef("void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);")
_libc: Any = _ffi.dlopen(None)
if _ffi.sizeof("long") != 8 or _ffi.sizeof("void *") != 8:
    raise ImportError("virtiofs.dax.window needs an LP64 platform")
_MAP_FAILED: Final = (1 << 64) - 1
# Reservations given up by DaxWindow._abandon: kept referenced so they are never unmapped.
_ABANDONED: list[mmap.mmap] = []


def _mmap_fixed(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """mmap(MAP_FIXED) at ``addr``; returns 0 or the errno.

    Callers validate against the window; this re-checks what mmap itself must never get
    (SECURITY B6 #18), because MAP_FIXED at a wrong address silently replaces whatever
    memory is there.
    """
    if not (
        addr > 0
        and addr % PAGE_SIZE == 0
        and 0 < length < 1 << 63
        and length % PAGE_SIZE == 0
        and addr + length < 1 << 64
        and 0 <= offset <= _OFF_T_MAX - length
    ):
        raise SystemError(f"refusing mmap({addr:#x}, {length:#x}, offset {offset:#x})")
    ret = _libc.mmap(_ffi.cast("void *", addr), length, prot, flags | _MAP_FIXED, fd, offset)
    got = int(_ffi.cast("uintptr_t", ret))
    if got == _MAP_FAILED:
        return _ffi.errno or errno.ENOMEM
    if got != addr:  # pragma: no cover - MAP_FIXED never moves; if it did, stop at once
        raise SystemError(f"mmap(MAP_FIXED) returned {got:#x} instead of {addr:#x}")
    return 0


class OverlapPolicy(Enum):
    """How a map or unmap that overlaps existing mappings is treated (see the module doc)."""

    EXACT = "exact"
    """Exact overlap replaces; other overlaps EINVAL; unmap must name one whole mapping."""
    SPLIT = "split"
    """virtio spec device text: any overlap replaces, partial overlap splits."""


@dataclass(frozen=True, slots=True)
class DaxMapping:
    """One file range mapped into the window (bookkeeping only: no fd is kept)."""

    moffset: int
    """Offset in the window."""
    length: int
    """Bytes mapped."""
    foffset: int
    """Offset in the file."""
    writable: bool
    """Mapped PROT_READ|PROT_WRITE (else PROT_READ)."""
    dev: int
    """``st_dev`` of the mapped file, as /proc/self/maps shows it."""
    ino: int
    """``st_ino`` of the mapped file."""

    @property
    def end(self) -> int:
        """Window offset one past the mapping."""
        return self.moffset + self.length

    def _piece(self, start: int, end: int) -> DaxMapping:
        """The part of this mapping in window offsets [start, end)."""
        return DaxMapping(
            start,
            end - start,
            self.foffset + (start - self.moffset),
            self.writable,
            self.dev,
            self.ino,
        )


def _refuse(what: str, err: int = errno.EINVAL, field: str | None = None) -> DaxMappingError:
    return DaxMappingError(what, field=field, errno=err)


def _release_reservation(mm: mmap.mmap, address: int, size: int) -> None:
    """Drop every file mapping, then the reservation unless a view still uses it."""
    if mm.closed:
        return
    # Placeholder first, in one call: this releases the file pages even when a view keeps the
    # address range alive, and a stale view then faults instead of reading file data.
    _mmap_fixed(address, size, _PROT_NONE, _PLACEHOLDER_FLAGS, -1, 0)
    try:
        mm.close()  # munmap of the whole reservation
    except BufferError:
        pass  # views exported: the mmap object unmaps when the last one goes


class DaxWindow:
    """The device-side DAX window: ``size`` bytes into which file ranges are mapped.

    ``alignment`` (a power of two, at least the page size) applies to ``moffset`` and
    ``foffset``, as ``fuse_init_out.map_alignment`` does; lengths need page alignment only.
    ``max_mappings`` bounds the bookkeeping (and the kernel VMAs we create): past it a map is
    refused with ENOMEM, the spec's "resources may run out". Thread-safe: map, unmap and the
    checked accessors serialise on one lock.
    """

    def __init__(
        self,
        size: int,
        *,
        alignment: int = PAGE_SIZE,
        overlap: OverlapPolicy = OverlapPolicy.EXACT,
        max_mappings: int = 16384,
    ) -> None:
        if type(alignment) is not int or alignment < PAGE_SIZE or alignment & (alignment - 1):
            raise LocalProtocolError(f"alignment {alignment!r} is not a power of two >= page size")
        if type(size) is not int or not 0 < size <= _MAX_WINDOW or size % alignment:
            raise LocalProtocolError(
                f"window size {size!r} is not a positive multiple of {alignment}"
            )
        if type(max_mappings) is not int or max_mappings < 1:
            raise LocalProtocolError(f"max_mappings {max_mappings!r} must be >= 1")
        if not isinstance(overlap, OverlapPolicy):
            raise LocalProtocolError(f"overlap {overlap!r} is not an OverlapPolicy")
        self._size = size
        self._alignment = alignment
        self._overlap = overlap
        self._max_mappings = max_mappings
        self._lock = threading.Lock()
        self._starts: list[int] = []  # sorted moffsets, parallel to _maps (bisect lookups)
        self._maps: list[DaxMapping] = []
        # The reservation is a Python mmap object so that memoryviews of the window keep it
        # alive and close() cannot free the range under them (B6 #18). It is created
        # read-write (so its buffer exports are writable) and turned into the PROT_NONE
        # placeholder at once.
        mm = mmap.mmap(-1, size, flags=_MAP_PRIVATE | _MAP_NORESERVE, prot=_PROT_READ | _PROT_WRITE)
        cdata = _ffi.from_buffer(mm)
        self._address = int(_ffi.cast("uintptr_t", cdata))
        _ffi.release(cdata)
        err = _mmap_fixed(self._address, size, _PROT_NONE, _PLACEHOLDER_FLAGS, -1, 0)
        if err:
            mm.close()
            raise OSError(err, f"cannot reserve the DAX window: {os.strerror(err)}")
        # Only this attribute, the finalizer and exported views reference the mmap object;
        # close() drops the first two so the last view to go unmaps the range.
        self._mm: mmap.mmap | None = mm
        self._finalizer = weakref.finalize(self, _release_reservation, mm, self._address, size)

    # ------------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        """Window size in bytes."""
        return self._size

    @property
    def address(self) -> int:
        """Virtual address of the window's first byte in this process (for FFI users)."""
        return self._address

    @property
    def alignment(self) -> int:
        """Required alignment of ``moffset`` and ``foffset``."""
        return self._alignment

    @property
    def overlap(self) -> OverlapPolicy:
        """The overlap policy chosen at construction."""
        return self._overlap

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._mm is None

    @property
    def view(self) -> memoryview:
        """A writable memoryview of the whole window (unchecked fast path; see module doc).

        Each call exports a new view; release it (``with w.view as v:``) when done so that
        :meth:`close` can give the address range back at once.
        """
        return memoryview(self._require_open())

    def mappings(self) -> tuple[DaxMapping, ...]:
        """All current mappings in window order."""
        with self._lock:
            return tuple(self._maps)

    def find(self, moffset: int) -> DaxMapping | None:
        """The mapping that contains window offset ``moffset``, or None (O(log n))."""
        with self._lock:
            return self._find(moffset)

    def __len__(self) -> int:
        return len(self._maps)

    def __repr__(self) -> str:
        state = "closed" if self._mm is None else f"{len(self._maps)} mappings"
        return f"<DaxWindow {self._size:#x} bytes at {self._address:#x}, {state}>"

    def __enter__(self) -> DaxWindow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ validation

    def _check_range(self, moffset: int, length: int, field: str) -> None:
        if type(moffset) is not int or type(length) is not int:
            raise _refuse("moffset and len must be integers", field=field)
        if not 0 <= moffset <= U64_MAX or not 0 <= length <= U64_MAX:
            raise _refuse(f"{field} outside u64", field=field)
        if length == 0:
            raise _refuse("zero-length range", field="len")
        # Written as cloud-hypervisor's is_req_valid: offset >= size, or len > size - offset,
        # which cannot overflow whatever the peer sends.
        if moffset >= self._size or length > self._size - moffset:
            raise _refuse(
                f"range {moffset:#x}+{length:#x} outside the {self._size:#x}-byte window",
                field=field,
            )
        if moffset % self._alignment:
            raise _refuse(
                f"moffset {moffset:#x} not aligned to {self._alignment:#x}", field="moffset"
            )
        if length % PAGE_SIZE:
            raise _refuse(f"len {length:#x} not a multiple of the page size", field="len")

    @staticmethod
    def _check_fd(fd: int, writable: bool) -> os.stat_result:
        if type(fd) is not int or not 0 <= fd < 1 << 31:  # fds are C ints
            raise _refuse(f"bad fd {fd!r}", errno.EBADF, "fd")
        try:
            st = os.fstat(fd)
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError as exc:
            raise _refuse(f"fd {fd}: {exc.strerror}", errno.EBADF, "fd") from None
        # Regular files only (memfds are regular): a device node in the window would hand the
        # driver host device memory (the CVE-2020-35517 class, SECURITY B1 #1).
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(f"fd {fd} is not a regular file", errno.EBADF, "fd")
        if fl & getattr(os, "O_PATH", 0o10000000):
            raise _refuse(f"fd {fd} is an O_PATH descriptor", errno.EBADF, "fd")
        # The errors mmap itself would give, checked before touching the window so that a
        # refused request changes nothing (mm/mmap.c do_mmap: EACCES).
        acc = fl & os.O_ACCMODE
        if acc == os.O_WRONLY:
            raise _refuse(f"fd {fd} is write-only", errno.EACCES, "fd")
        if writable and (acc != os.O_RDWR or fl & os.O_APPEND):
            raise _refuse(f"writable mapping of fd {fd} not open O_RDWR", errno.EACCES, "fd")
        return st

    def _find(self, moffset: int) -> DaxMapping | None:
        i = bisect.bisect_right(self._starts, moffset) - 1
        if i >= 0 and self._maps[i].end > moffset:
            return self._maps[i]
        return None

    def _overlapping(self, start: int, end: int) -> tuple[int, int]:
        """Index range [lo, hi) of the mappings overlapping window offsets [start, end)."""
        lo = bisect.bisect_right(self._starts, start) - 1
        if lo < 0 or self._maps[lo].end <= start:
            lo += 1
        hi = bisect.bisect_left(self._starts, end, lo)
        return lo, hi

    def _carve(self, start: int, end: int, lo: int, hi: int) -> list[DaxMapping]:
        """The pieces of mappings [lo, hi) left outside [start, end) (at most two)."""
        keep: list[DaxMapping] = []
        if lo < hi:
            first, last = self._maps[lo], self._maps[hi - 1]
            if first.moffset < start:
                keep.append(first._piece(first.moffset, start))
            if last.end > end:
                keep.append(last._piece(end, last.end))
        return keep

    def _replace(self, lo: int, hi: int, new: Iterable[DaxMapping]) -> list[DaxMapping]:
        removed = self._maps[lo:hi]
        items = sorted(new, key=lambda m: m.moffset)
        self._maps[lo:hi] = items
        self._starts[lo:hi] = [m.moffset for m in items]
        return removed

    def _remap(
        self, moffset: int, length: int, prot: int, flags: int, fd: int, foffset: int
    ) -> int:
        """``_mmap_fixed`` inside this window only: the one path to mmap for a window range."""
        if self._mm is None or not (0 <= moffset and 0 < length <= self._size - moffset):
            raise SystemError(f"refusing to remap {moffset:#x}+{length:#x} of the window")
        return _mmap_fixed(self._address + moffset, length, prot, flags, fd, foffset)

    def _require_open(self) -> mmap.mmap:
        mm = self._mm
        if mm is None:
            raise LocalProtocolError("DAX window is closed")
        return mm

    # ------------------------------------------------------------------ map / unmap

    def map(
        self, moffset: int, length: int, fd: int, foffset: int, writable: bool = False
    ) -> DaxMapping:
        """Map ``length`` bytes of ``fd`` at ``foffset`` to window offset ``moffset``.

        The caller keeps ``fd`` (it may close it right after: the mapping holds the file).
        Raises :class:`DaxMappingError` with the errno to answer, having changed nothing --
        except when the kernel itself refuses the mmap after our checks passed (e.g. ENOMEM
        for too many VMAs): then the target range is left unmapped (placeholder), never a hole.
        """
        with self._lock:
            self._require_open()
            self._check_range(moffset, length, "moffset")
            if type(foffset) is not int or not 0 <= foffset <= U64_MAX:
                raise _refuse("foffset outside u64", field="foffset")
            if foffset % self._alignment:
                raise _refuse(
                    f"foffset {foffset:#x} not aligned to {self._alignment:#x}", field="foffset"
                )
            if foffset > _OFF_T_MAX - length:
                raise _refuse("foffset + len overflows off_t", field="foffset")
            if type(writable) is not bool:
                raise _refuse("writable must be a bool", field="flags")
            st = self._check_fd(fd, writable)
            end = moffset + length
            lo, hi = self._overlapping(moffset, end)
            keep: list[DaxMapping] = []
            if lo < hi and self._overlap is OverlapPolicy.EXACT:
                old = self._maps[lo]
                if hi - lo != 1 or old.moffset != moffset or old.length != length:
                    raise _refuse(
                        f"range {moffset:#x}+{length:#x} partially overlaps a mapping",
                        field="moffset",
                    )
            elif lo < hi:
                keep = self._carve(moffset, end, lo, hi)
            if len(self._maps) - (hi - lo) + len(keep) + 1 > self._max_mappings:
                raise _refuse(f"more than {self._max_mappings} mappings", errno.ENOMEM)
            prot = _PROT_READ | (_PROT_WRITE if writable else 0)
            err = self._remap(moffset, length, prot, _MAP_SHARED, fd, foffset)
            if err:
                # Older kernels may already have unmapped the target before failing: put the
                # placeholder back so the range can never become a hole, and forget what was
                # there.
                if self._remap(moffset, length, _PROT_NONE, _PLACEHOLDER_FLAGS, -1, 0):
                    self._abandon()
                    raise _refuse(
                        f"mmap failed ({os.strerror(err)}) and the range could not be reset", err
                    )
                self._replace(lo, hi, keep)
                raise _refuse(f"mmap failed: {os.strerror(err)}", err)
            mapping = DaxMapping(moffset, length, foffset, writable, st.st_dev, st.st_ino)
            self._replace(lo, hi, [*keep, mapping])
            return mapping

    def unmap(self, moffset: int, length: int) -> list[DaxMapping]:
        """Put the placeholder back over ``[moffset, moffset+length)``; returns what was removed.

        ``length == 2**64 - 1`` removes every mapping whatever ``moffset`` is.
        """
        with self._lock:
            self._require_open()
            if type(length) is int and length == U64_MAX:
                return self._unmap_all()
            self._check_range(moffset, length, "moffset")
            end = moffset + length
            lo, hi = self._overlapping(moffset, end)
            if self._overlap is OverlapPolicy.EXACT:
                old = self._maps[lo] if hi - lo == 1 else None
                if old is None or old.moffset != moffset or old.length != length:
                    raise _refuse(
                        f"unmap {moffset:#x}+{length:#x} does not name one whole mapping",
                        field="moffset",
                    )
                keep: list[DaxMapping] = []
            else:
                if lo == hi:
                    return []
                keep = self._carve(moffset, end, lo, hi)
                # Only the mapped part needs the placeholder; unmapped parts already have it.
                moffset = max(moffset, self._maps[lo].moffset)
                end = min(end, self._maps[hi - 1].end)
            err = self._remap(moffset, end - moffset, _PROT_NONE, _PLACEHOLDER_FLAGS, -1, 0)
            if err:
                raise _refuse(f"placeholder mmap failed: {os.strerror(err)}", err)
            return self._replace(lo, hi, keep)

    def unmap_all(self) -> list[DaxMapping]:
        """Remove every mapping (device reset drops all maps, SPEC 3.5)."""
        with self._lock:
            self._require_open()
            return self._unmap_all()

    def _unmap_all(self) -> list[DaxMapping]:
        if not self._maps:
            return []
        err = self._remap(0, self._size, _PROT_NONE, _PLACEHOLDER_FLAGS, -1, 0)
        if err:
            raise _refuse(f"placeholder mmap failed: {os.strerror(err)}", err)
        return self._replace(0, len(self._maps), [])

    # ------------------------------------------------------------------ checked access

    def _check_mapped(self, moffset: int, length: int, write: bool) -> None:
        if type(moffset) is not int or type(length) is not int or length < 0:
            raise LocalProtocolError("offset and length must be non-negative integers")
        if moffset < 0 or moffset > self._size or length > self._size - moffset:
            raise LocalProtocolError(f"access {moffset:#x}+{length:#x} outside the window")
        pos, end = moffset, moffset + length
        i = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            m = self._maps[i] if 0 <= i < len(self._maps) else None
            if m is None or not m.moffset <= pos < m.end:
                raise LocalProtocolError(f"window offset {pos:#x} is not mapped")
            if write and not m.writable:
                raise LocalProtocolError(f"window offset {pos:#x} is mapped read-only")
            pos = m.end
            i += 1

    def read(self, moffset: int, length: int) -> bytes:
        """Copy ``length`` bytes out of the window after checking they are mapped."""
        with self._lock:
            mm = self._require_open()
            self._check_mapped(moffset, length, False)
            return mm[moffset : moffset + length]

    def readinto(self, moffset: int, buffer: Any) -> int:
        """Fill ``buffer`` (writable bytes-like) from the window; returns its length."""
        with memoryview(buffer) as dst, self._lock:
            mm = self._require_open()
            n = dst.nbytes
            self._check_mapped(moffset, n, False)
            with memoryview(mm) as src:
                dst.cast("B")[:] = src[moffset : moffset + n]
            return n

    def write(self, moffset: int, data: Any) -> int:
        """Copy ``data`` into writable mappings of the window; returns the byte count."""
        with memoryview(data) as src, self._lock:
            mm = self._require_open()
            n = src.nbytes
            self._check_mapped(moffset, n, True)
            mm[moffset : moffset + n] = src.cast("B")
            return n

    def sync(self, moffset: int, length: int) -> None:
        """msync(MS_SYNC) a mapped range: the DAX equivalent of FUSE_FSYNC for its pages."""
        with self._lock:
            mm = self._require_open()
            self._check_mapped(moffset, length, False)
            if length:
                start = moffset - moffset % PAGE_SIZE
                mm.flush(start, moffset + length - start)

    # ------------------------------------------------------------------ teardown

    def _abandon(self) -> None:
        """Give up on a window whose layout we can no longer vouch for (double mmap failure).

        Part of the range may be a hole that another mmap in the process now owns, so neither
        the placeholder nor munmap may touch it again: the reservation is leaked on purpose.
        """
        if self._mm is not None:
            _ABANDONED.append(self._mm)
        self._mm = None
        self._finalizer.detach()

    def close(self) -> None:
        """Unmap every file range and give the address range back.

        Idempotent. If memoryviews of the window are still alive the range stays reserved
        (inaccessible) until the last one is released; the file mappings go at once.
        """
        with self._lock:
            self._mm = None
            self._maps.clear()
            self._starts.clear()
            self._finalizer()
