"""A descriptor chain as the device sees it: readable bytes in, writable bytes out.

The device reads the request as one byte stream over the readable buffers and writes the reply as
one byte stream over the writable ones, whatever the split into descriptors: Linux sends a FUSE
request as ``in_header`` (40 B), one bounce buffer with the other in-args, then page buffers, and
offers ``out_header`` (16 B), the out-args area, then pages (``virtio_fs_enqueue_req``). Never
assume one descriptor per struct (virtiofsd ``descriptor_utils.rs`` Reader/Writer).

Buffers are memoryviews straight into guest memory: :meth:`DescriptorChain.read_views` and
:meth:`DescriptorChain.writable_views` give them to ``os.pwritev``/``os.preadv`` with no copy.
The guest may change readable bytes at any time: parse from the copies :meth:`read` returns,
never twice from the views.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import TypeAlias

from virtiofs.errors import ProtocolError
from virtiofs.protocol.schema import sizeof
from virtiofs.protocol.structs import InHeader

__all__ = ["FUSE_IN_HEADER_SIZE", "DescriptorChain"]

# sizeof(struct fuse_in_header): 40; its first field is the u32 total length of the request.
FUSE_IN_HEADER_SIZE = sizeof(InHeader)
_U32 = struct.Struct("<I")

BytesLike: TypeAlias = bytes | bytearray | memoryview


def _locate(bufs: list[memoryview], pos: int) -> tuple[int, int]:
    """Index of the buffer holding stream offset ``pos`` and the offset inside it."""
    i = 0
    for b in bufs:
        n = len(b)
        if pos < n:
            return i, pos
        pos -= n
        i += 1
    return i, pos


class DescriptorChain:
    """One available buffer popped by the device.

    ``head`` identifies it to the used ring (split: head descriptor index; packed: buffer id);
    ``readable``/``writable`` are the device-readable and device-writable buffers, in chain
    order, as memoryviews into guest memory (zero-length descriptors are left out);
    ``readable_len``/``writable_len`` their totals; ``ndesc`` the ring descriptors it used
    (what a packed ring skips on completion).

    A chain carries two cursors: a read position over the readable stream (:meth:`read`,
    :meth:`read_views`, :meth:`read_fuse_request`) and a write position over the writable
    stream (:meth:`write`, :meth:`writev`). ``written`` is the highest writable offset filled
    through this object; :meth:`push` uses it when no length is given. After writing through
    :meth:`writable_views` yourself, pass the length to ``push`` or call :meth:`mark_written`.
    """

    __slots__ = (
        "head", "readable", "writable", "readable_len", "writable_len", "ndesc",
        "_rpos", "_wpos", "written",
    )

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
        ndesc: int = 1,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.ndesc = ndesc
        self._rpos = 0
        self._wpos = 0
        self.written = 0

    @property
    def id(self) -> int:
        """Alias of ``head`` (the packed ring calls it the buffer id)."""
        return self.head

    def __repr__(self) -> str:
        return (f"DescriptorChain(head={self.head}, readable={len(self.readable)} bufs/"
                f"{self.readable_len} B, writable={len(self.writable)} bufs/{self.writable_len} B)")

    # -- reading --------------------------------------------------------------------------

    @property
    def read_pos(self) -> int:
        """Offset of the next byte :meth:`read` returns."""
        return self._rpos

    @read_pos.setter
    def read_pos(self, pos: int) -> None:
        if not 0 <= pos <= self.readable_len:
            raise ValueError(f"read position {pos} outside 0..{self.readable_len}")
        self._rpos = pos

    @property
    def readable_remaining(self) -> int:
        """Readable bytes not yet consumed."""
        return self.readable_len - self._rpos

    def read_views(self, n: int) -> list[memoryview]:
        """Views of the next ``min(n, remaining)`` readable bytes (no copy); advances the cursor."""
        n = max(0, min(n, self.readable_len - self._rpos))
        out: list[memoryview] = []
        if not n:
            return out
        i, off = _locate(self.readable, self._rpos)
        self._rpos += n
        bufs = self.readable
        while n:
            b = bufs[i]
            k = min(n, len(b) - off)
            out.append(b[off:off + k] if off or k != len(b) else b)
            n -= k
            off = 0
            i += 1
        return out

    def read(self, n: int = -1) -> bytes:
        """Copy the next ``n`` readable bytes (all that is left if ``n < 0``); may return fewer
        at the end of the readable part."""
        if n < 0:
            n = self.readable_len - self._rpos
        views = self.read_views(n)
        if len(views) == 1:
            return bytes(views[0])
        return b"".join(views)

    def read_all(self) -> bytes:
        """Copy every readable byte from the start (the cursor ends at the end)."""
        self._rpos = 0
        return self.read()

    def read_fuse_request(self) -> bytes:
        """Copy one FUSE request (``fuse_in_header.len`` bytes) from the read cursor.

        The length is read once from the copied header (the guest may rewrite it), and must be
        at least the header size and at most what the readable part holds; otherwise
        :class:`ProtocolError` (``field="len"``) and the cursor is left where it was. Trailing
        readable bytes past ``len`` are left unread.
        """
        start = self._rpos
        rem = self.readable_len - start
        if rem < FUSE_IN_HEADER_SIZE:
            raise ProtocolError(
                f"readable part holds {rem} bytes, less than a fuse_in_header", field="len")
        header = self.read(FUSE_IN_HEADER_SIZE)
        (length,) = _U32.unpack_from(header)
        if length < FUSE_IN_HEADER_SIZE or length > rem:
            self._rpos = start
            raise ProtocolError(
                f"fuse_in_header.len {length} but the readable part holds {rem} bytes",
                field="len")
        if length == FUSE_IN_HEADER_SIZE:
            return header
        return header + self.read(length - FUSE_IN_HEADER_SIZE)

    # -- writing --------------------------------------------------------------------------

    @property
    def write_pos(self) -> int:
        """Offset in the writable stream where :meth:`write` puts its next byte."""
        return self._wpos

    @write_pos.setter
    def write_pos(self, pos: int) -> None:
        if not 0 <= pos <= self.writable_len:
            raise ValueError(f"write position {pos} outside 0..{self.writable_len}")
        self._wpos = pos

    @property
    def writable_remaining(self) -> int:
        """Writable bytes after the write cursor."""
        return self.writable_len - self._wpos

    def writable_views(self, length: int | None = None, offset: int | None = None) -> list[memoryview]:
        """Views of writable guest memory from ``offset`` (default: the write cursor) for
        ``length`` bytes (default: to the end), clipped to the writable part. The cursor does
        not move: this is for ``os.preadv(fd, views, pos)`` straight into guest memory."""
        if offset is None:
            offset = self._wpos
        if not 0 <= offset <= self.writable_len:
            raise ValueError(f"offset {offset} outside 0..{self.writable_len}")
        avail = self.writable_len - offset
        n = avail if length is None else max(0, min(length, avail))
        out: list[memoryview] = []
        if not n:
            return out
        i, off = _locate(self.writable, offset)
        bufs = self.writable
        while n:
            b = bufs[i]
            k = min(n, len(b) - off)
            out.append(b[off:off + k] if off or k != len(b) else b)
            n -= k
            off = 0
            i += 1
        return out

    def mark_written(self, end: int) -> None:
        """Record that the writable stream is filled up to ``end`` (after direct view writes)."""
        if not 0 <= end <= self.writable_len:
            raise ValueError(f"written end {end} outside 0..{self.writable_len}")
        if end > self.written:
            self.written = end

    def write_at(self, offset: int, data: BytesLike) -> int:
        """Scatter ``data`` into the writable stream at ``offset``; returns the bytes that fit.

        The write cursor does not move; ``written`` grows to cover the bytes written.
        """
        src = data if isinstance(data, memoryview) else memoryview(data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        total = len(src)
        if not 0 <= offset <= self.writable_len:
            raise ValueError(f"offset {offset} outside 0..{self.writable_len}")
        if not total:
            return 0
        bufs = self.writable
        # One-buffer fast path: a reply header or a small reply into the first buffer.
        if bufs and offset + total <= len(bufs[0]):
            bufs[0][offset:offset + total] = src
            n = total
        else:
            i, off = _locate(bufs, offset)
            n = 0
            while n < total and i < len(bufs):
                b = bufs[i]
                k = min(total - n, len(b) - off)
                b[off:off + k] = src[n:n + k]
                n += k
                off = 0
                i += 1
        if offset + n > self.written:
            self.written = offset + n
        return n

    def write(self, data: BytesLike) -> int:
        """Scatter ``data`` at the write cursor and advance it; returns the bytes that fit."""
        n = self.write_at(self._wpos, data)
        self._wpos += n
        return n

    def writev(self, buffers: Iterable[BytesLike]) -> int:
        """Write several buffers in sequence (``os.writev``-like); stops at the first that does
        not fit entirely and returns the total bytes written."""
        total = 0
        for b in buffers:
            want = len(b) if not isinstance(b, memoryview) else b.nbytes
            n = self.write(b)
            total += n
            if n < want:
                break
        return total
