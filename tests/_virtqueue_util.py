"""Shared helpers for the virtqueue tests: queue pairs over one memory, hostile-ring writers."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from virtiofs.virtqueue import (
    GuestAllocator,
    GuestMemory,
    PackedDeviceQueue,
    PackedDriverQueue,
    PackedLayout,
    SplitDeviceQueue,
    SplitDriverQueue,
    SplitLayout,
)

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
ELEM = struct.Struct("<II")


@dataclass
class Pair:
    """A driver queue and a device queue over the same memory."""

    kind: str
    mem: GuestMemory
    alloc: GuestAllocator
    layout: Any
    drv: Any
    dev: Any
    event_idx: bool
    indirect: bool

    def new_device(self, **kw: Any) -> Any:
        cls = SplitDeviceQueue if self.kind == "split" else PackedDeviceQueue
        return cls(self.mem, self.layout, event_idx=self.event_idx, indirect=self.indirect, **kw)


def make_pair(
    kind: str, size: int = 16, *, event_idx: bool = False, indirect: bool = False,
    use_indirect: bool = False, mem_size: int = 1 << 20,
) -> Pair:
    mem = GuestMemory.allocate(mem_size)
    alloc = GuestAllocator(mem, 0, mem_size)
    if kind == "split":
        layout: Any = SplitLayout.allocate(alloc, size)
        drv: Any = SplitDriverQueue(mem, layout, alloc, event_idx=event_idx, indirect=indirect,
                                    use_indirect=use_indirect)
        dev: Any = SplitDeviceQueue(mem, layout, event_idx=event_idx, indirect=indirect)
    else:
        layout = PackedLayout.allocate(alloc, size)
        drv = PackedDriverQueue(mem, layout, alloc, event_idx=event_idx, indirect=indirect,
                                use_indirect=use_indirect)
        dev = PackedDeviceQueue(mem, layout, event_idx=event_idx, indirect=indirect)
    return Pair(kind, mem, alloc, layout, drv, dev, event_idx, indirect)


class HostileSplitDriver:
    """Writes a split ring by hand, as a buggy or malicious driver would."""

    def __init__(self, mem: GuestMemory, layout: SplitLayout) -> None:
        self.mem = mem
        self.layout = layout
        self.idx = 0

    def desc(self, i: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        self.mem.write(self.layout.desc + 16 * i, DESC.pack(addr, length, flags, next_))

    def table(self, addr: int, entries: list[tuple[int, int, int, int]]) -> None:
        self.mem.write(addr, b"".join(DESC.pack(*e) for e in entries))

    def publish(self, *heads: int) -> None:
        for h in heads:
            self.mem.write(self.layout.avail + 4 + 2 * (self.idx % self.layout.size),
                           U16.pack(h))
            self.idx = (self.idx + 1) & 0xFFFF
        self.set_idx(self.idx)

    def set_idx(self, idx: int) -> None:
        self.mem.write(self.layout.avail + 2, U16.pack(idx & 0xFFFF))

    def used(self) -> list[tuple[int, int]]:
        """All used elements written so far (up to the used idx, within one lap)."""
        idx = U16.unpack(self.mem.read(self.layout.used + 2, 2))[0]
        return [ELEM.unpack(self.mem.read(self.layout.used + 4 + 8 * (k % self.layout.size), 8))
                for k in range(idx)]


class HostilePackedDriver:
    """Writes a packed ring by hand; tracks the driver position and wrap counter."""

    AVAIL = 1 << 7
    USED = 1 << 15

    def __init__(self, mem: GuestMemory, layout: PackedLayout) -> None:
        self.mem = mem
        self.layout = layout
        self.pos = 0
        self.wrap = True

    def bits(self, wrap: bool | None = None) -> int:
        w = self.wrap if wrap is None else wrap
        return self.AVAIL if w else self.USED

    def write(self, pos: int, addr: int, length: int, bid: int, flags: int) -> None:
        self.mem.write(self.layout.desc + 16 * pos, DESC.pack(addr, length, bid, flags))

    def chain(self, descs: list[tuple[int, int, int]], bid: int) -> None:
        """Make ``[(addr, len, flags)]`` available as one chain (NEXT added, head last)."""
        positions = []
        for k, (addr, length, flags) in enumerate(descs):
            f = flags | (1 if k < len(descs) - 1 else 0) | self.bits()
            positions.append((self.pos, addr, length, f))
            self.pos += 1
            if self.pos == self.layout.size:
                self.pos = 0
                self.wrap = not self.wrap
        for pos, addr, length, f in reversed(positions):
            self.write(pos, addr, length, bid, f)
