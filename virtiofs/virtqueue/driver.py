"""What the split and packed driver roles share: staging buffers and completing requests.

The driver role is the user-space counterpart of the Linux virtio driver: it lends buffers to the
device and takes them back. It treats the device as hostile (SECURITY.md B2, intel/MigTD#986):
every used id must name a request it has outstanding, every used length must fit the writable
bytes it lent, and it never re-reads its own descriptors from shared memory (the device could
have rewritten them): it keeps a private record of each request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, TypeAlias

from virtiofs.errors import LocalProtocolError, VirtqueueError
from virtiofs.virtqueue.memory import Buffer, GuestAllocator, GuestMemory

__all__ = ["Completion", "ReadableItem", "WritableItem"]

ReadableItem: TypeAlias = bytes | bytearray | memoryview | Buffer
"""A device-readable buffer: bytes to copy into driver-allocated guest memory, or a
:class:`Buffer` the caller already filled (zero copy)."""

WritableItem: TypeAlias = int | Buffer
"""A device-writable buffer: a size to allocate, or a caller-owned :class:`Buffer`."""


class Completion(NamedTuple):
    """A request the device has returned.

    ``token`` is what was given to ``add`` (the head/id when none was); ``length`` the used
    length (bytes the device says it wrote); ``data`` those bytes copied out of the writable
    buffers (empty when the request was added with ``gather=False``); ``error`` is set (and
    ``length`` is 0, ``data`` empty) when the device reported more bytes than were lent: the
    request is over but its reply must not be trusted; ``head`` the head index / buffer id.
    """

    token: object
    length: int
    data: bytes
    error: VirtqueueError | None = None
    head: int = -1


class _Pending:
    """The driver's private record of an outstanding request."""

    __slots__ = ("token", "descs", "ndesc", "owned", "wsegs", "wlen", "gather")

    def __init__(
        self, token: object, descs: list[int], ndesc: int, owned: list[int],
        wsegs: list[tuple[int, int]], wlen: int, gather: bool,
    ) -> None:
        self.token = token
        self.descs = descs
        self.ndesc = ndesc
        self.owned = owned
        self.wsegs = wsegs
        self.wlen = wlen
        self.gather = gather


class _DriverBuffers:
    """Buffer staging over a GuestMemory and an optional allocator (mixin for both layouts)."""

    mem: GuestMemory
    allocator: GuestAllocator | None

    def _alloc(self, n: int, owned: list[int]) -> int:
        if self.allocator is None:
            self._release(owned)
            raise LocalProtocolError("this driver queue has no allocator: pass Buffer objects")
        try:
            addr = self.allocator.alloc(max(n, 1), 16)
        except LocalProtocolError:
            self._release(owned)
            raise
        owned.append(addr)
        return addr

    def _release(self, owned: list[int]) -> None:
        if self.allocator is not None:
            for a in owned:
                self.allocator.free(a)
        owned.clear()

    def _stage(
        self, readable: Sequence[ReadableItem], writable: Sequence[WritableItem]
    ) -> tuple[list[tuple[int, int, bool]], list[int], list[tuple[int, int]], int]:
        """Place every buffer in guest memory: ``(segments, owned allocations, writable
        segments, writable total)``; a segment is ``(addr, length, device_writable)``."""
        segs: list[tuple[int, int, bool]] = []
        owned: list[int] = []
        wsegs: list[tuple[int, int]] = []
        wlen = 0
        for item in readable:
            if isinstance(item, Buffer):
                addr, n = item
                if n < 0 or not self.mem.check_range(addr, n):
                    self._release(owned)
                    raise LocalProtocolError(f"{item!r} is not inside guest memory")
            else:
                n = len(item) if not isinstance(item, memoryview) else item.nbytes
                addr = self._alloc(n, owned)
                if n:
                    self.mem.write(addr, item)
            segs.append((addr, n, False))
        for witem in writable:
            if isinstance(witem, Buffer):
                addr, n = witem
                if n < 0 or not self.mem.check_range(addr, n):
                    self._release(owned)
                    raise LocalProtocolError(f"{witem!r} is not inside guest memory")
            elif isinstance(witem, int) and witem >= 0:
                n = witem
                addr = self._alloc(n, owned)
            else:
                self._release(owned)
                raise LocalProtocolError(f"writable item {witem!r} is neither a size nor a Buffer")
            segs.append((addr, n, True))
            wsegs.append((addr, n))
            wlen += n
        if not segs:
            raise LocalProtocolError("a chain needs at least one buffer")
        if wlen > 0xFFFF_FFFF:
            self._release(owned)
            raise LocalProtocolError("more than 2**32 - 1 writable bytes in one chain")
        return segs, owned, wsegs, wlen

    def _complete(self, p: _Pending, head: int, length: int) -> Completion:
        """Turn a used element into a Completion and free what the request owned."""
        error: VirtqueueError | None = None
        data = b""
        if length > p.wlen:
            # intel/MigTD#986: an over-reported used length must not make us read past the
            # buffers we lent (they may border other requests' data).
            error = VirtqueueError(
                f"device reported {length} bytes written into {p.wlen} writable bytes "
                f"(head {head})", field="used.len")
            length = 0
        elif p.gather and length:
            parts = []
            left = length
            for addr, n in p.wsegs:
                if not left:
                    break
                k = min(n, left)
                parts.append(self.mem.read(addr, k))
                left -= k
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._release(p.owned)
        return Completion(p.token, length, data, error, head)
