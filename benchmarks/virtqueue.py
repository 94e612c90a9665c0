#!/usr/bin/env python3
"""Device-side virtqueue throughput: pop + push of a 2-descriptor chain (readable 64 B, writable
128 B), split and packed, against a hand-written ``struct`` floor measured in the same run.

The floor does the same ring reads/writes and memoryview slicing with no validation, no chain
object and no bookkeeping: what any Python device must pay at least. The driver side republishes
the chains between rounds outside the timed region (it is not what is measured).

    python3 benchmarks/virtqueue.py            # pinned to CPU 0 (FACTS.md: pin or the numbers
                                               # mean nothing), 5 runs, median [min-max]
    python3 benchmarks/virtqueue.py --cpu-time # CPU time, when other load shares the machine
    python3 benchmarks/virtqueue.py --fields   # cffi vs struct ring-field access (split.py)
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
import timeit
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from virtiofs.virtqueue import (  # noqa: E402
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    GuestMemory,
    PackedDeviceQueue,
    PackedLayout,
    SplitDeviceQueue,
    SplitLayout,
)

QSIZE = 256
CHAINS = QSIZE // 2  # 2 descriptors each
BUF = 0x10000  # buffers start here
RLEN, WLEN = 64, 128
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
ELEM = struct.Struct("<II")


class Split:
    """A split ring with CHAINS static 2-descriptor chains; `publish` makes them all available."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.layout = SplitLayout.place(0, QSIZE)
        v = mem.translate(0, self.layout.end)
        for i in range(CHAINS):
            DESC.pack_into(v, 32 * i, BUF + 256 * i, RLEN, VIRTQ_DESC_F_NEXT, 2 * i + 1)
            DESC.pack_into(v, 32 * i + 16, BUF + 256 * i + 64, WLEN, VIRTQ_DESC_F_WRITE, 0)
        self.avail = mem.translate(self.layout.avail, 6 + 2 * QSIZE)
        self.idx = 0

    def publish(self) -> None:
        for _ in range(CHAINS):
            U16.pack_into(self.avail, 4 + 2 * (self.idx % QSIZE), 2 * (self.idx % CHAINS))
            self.idx = (self.idx + 1) & 0xFFFF
        U16.pack_into(self.avail, 2, self.idx)


class Packed:
    """A packed ring of CHAINS 2-descriptor chains; `publish` marks a full lap available."""

    def __init__(self, mem: GuestMemory) -> None:
        self.layout = PackedLayout.place(0, QSIZE)
        self.desc = mem.translate(0, 16 * QSIZE)
        self.wrap = True

    def publish(self) -> None:
        bits = VIRTQ_DESC_F_AVAIL if self.wrap else VIRTQ_DESC_F_USED
        for i in range(CHAINS):
            DESC.pack_into(self.desc, 32 * i + 16, BUF + 256 * i + 64, WLEN, i,
                           VIRTQ_DESC_F_WRITE | bits)
            DESC.pack_into(self.desc, 32 * i, BUF + 256 * i, RLEN, i, VIRTQ_DESC_F_NEXT | bits)
        self.wrap = not self.wrap


CLOCK: Callable[[], float] = time.perf_counter


def timed_rounds(publish: Callable[[], None], serve: Callable[[], int], total: int) -> float:
    """Chains per second of `serve` (one round = CHAINS chains), publish untimed."""
    done = 0
    spent = 0.0
    clock = CLOCK
    while done < total:
        publish()
        t = clock()
        n = serve()
        spent += clock() - t
        assert n == CHAINS, n
        done += n
    return done / spent


def bench_split_lib(total: int, batch: bool) -> float:
    mem = GuestMemory.allocate(1 << 20)
    ring = Split(mem)
    q = SplitDeviceQueue(mem, ring.layout)

    def serve() -> int:
        n = 0
        if batch:
            chains = q.pop_many(CHAINS)
            q.push_many([(c, 16) for c in chains])
            return len(chains)
        pop, push = q.pop, q.push
        while (c := pop()) is not None:
            push(c, 16)
            n += 1
        return n

    r = timed_rounds(ring.publish, serve, total)
    mem.close()
    return r


def bench_split_floor(total: int) -> float:
    mem = GuestMemory.allocate(1 << 20)
    ring = Split(mem)
    L = ring.layout
    mv = mem.regions[0].view
    unpack_desc, unpack_h, pack_h, pack_elem = (
        DESC.unpack_from, U16.unpack_from, U16.pack_into, ELEM.pack_into)
    state = [0, 0]  # next_avail, next_used

    def serve() -> int:
        na, nu = state
        n = 0
        avail, used, desc = L.avail, L.used, L.desc
        while True:
            if unpack_h(mv, avail + 2)[0] == na:
                break
            head = unpack_h(mv, avail + 4 + 2 * (na & (QSIZE - 1)))[0]
            na = (na + 1) & 0xFFFF
            a, ln, f, nx = unpack_desc(mv, desc + 16 * head)
            r = [mv[a:a + ln]]
            a, ln, f, _ = unpack_desc(mv, desc + 16 * nx)
            w = [mv[a:a + ln]]
            del r, w
            pack_elem(mv, used + 4 + 8 * (nu & (QSIZE - 1)), head, 16)
            nu = (nu + 1) & 0xFFFF
            pack_h(mv, used + 2, nu)
            n += 1
        state[:] = [na, nu]
        return n

    r = timed_rounds(ring.publish, serve, total)
    mem.close()
    return r


def bench_packed_lib(total: int) -> float:
    mem = GuestMemory.allocate(1 << 20)
    ring = Packed(mem)
    q = PackedDeviceQueue(mem, ring.layout)

    def serve() -> int:
        n = 0
        pop, push = q.pop, q.push
        while (c := pop()) is not None:
            push(c, 16)
            n += 1
        return n

    r = timed_rounds(ring.publish, serve, total)
    mem.close()
    return r


def bench_packed_floor(total: int) -> float:
    mem = GuestMemory.allocate(1 << 20)
    ring = Packed(mem)
    mv = mem.regions[0].view
    unpack_desc, unpack_h, pack_h = DESC.unpack_from, U16.unpack_from, U16.pack_into
    len_id = struct.Struct("<IH").pack_into
    state = [0, True, 0, True]

    def serve() -> int:
        pos, wrap, upos, uwrap = state
        n = 0
        while True:
            want = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
            if unpack_h(mv, 16 * pos + 14)[0] & 0x8080 != want:
                break
            a, ln, bid, f = unpack_desc(mv, 16 * pos)
            r = [mv[a:a + ln]]
            a, ln, bid, f = unpack_desc(mv, 16 * pos + 16)
            w = [mv[a:a + ln]]
            del r, w
            pos += 2
            if pos >= QSIZE:
                pos -= QSIZE
                wrap = not wrap
            len_id(mv, 16 * upos + 8, 16, bid)
            pack_h(mv, 16 * upos + 14, (0x8080 if uwrap else 0) | 2)
            upos += 2
            if upos >= QSIZE:
                upos -= QSIZE
                uwrap = not uwrap
            n += 1
        state[:] = [pos, wrap, upos, uwrap]
        return n

    r = timed_rounds(ring.publish, serve, total)
    mem.close()
    return r


def fields() -> None:
    """cffi views vs struct on a memoryview, per ring-field access (the figures in split.py)."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef("struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };"
             "struct vring_used_elem { uint32_t id; uint32_t len; };")
    mem = GuestMemory.allocate(1 << 16)
    mv = mem.regions[0].view
    g = {
        "mv": mv,
        "descs": ffi.from_buffer("struct vring_desc[]", mv[0:4096]),
        "used": ffi.from_buffer("struct vring_used_elem[]", mv[8192:12288]),
        "u16": ffi.from_buffer("uint16_t[]", mv[4096:8192]),
        "unpack_desc": DESC.unpack_from, "unpack_h": U16.unpack_from,
        "pack_h": U16.pack_into, "pack_elem": ELEM.pack_into,
    }
    n = 500_000
    rows = [
        ("descriptor read", "unpack_desc(mv, 160)",
         "d = descs[10]; (d.addr, d.len, d.flags, d.next)"),
        ("used element write", "pack_elem(mv, 8200, 5, 100)",
         "e = used[1]; e.id = 5; e.len = 100"),
        ("u16 read", "unpack_h(mv, 4098)[0]", "u16[1]"),
        ("u16 write", "pack_h(mv, 4098, 7)", "u16[1] = 7"),
    ]
    print(f"{'field access':22} {'struct ns':>10} {'cffi ns':>10}")
    for name, s_stmt, c_stmt in rows:
        s = min(timeit.repeat(s_stmt, globals=g, number=n, repeat=5)) / n * 1e9
        c = min(timeit.repeat(c_stmt, globals=g, number=n, repeat=5)) / n * 1e9
        print(f"{name:22} {s:10.1f} {c:10.1f}")
    for k in ("descs", "used", "u16"):
        ffi.release(g[k])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=200_000, help="chains per run")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-pin", action="store_true", help="do not pin to CPU 0")
    ap.add_argument("--fields", action="store_true", help="cffi vs struct field access only")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the thread's CPU clock instead of the wall clock (for a "
                         "machine shared with other load: time spent descheduled is left out)")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.thread_time
    if not args.no_pin:
        os.sched_setaffinity(0, {0})
    if args.fields:
        fields()
        return
    cases: list[tuple[str, Callable[[int], float]]] = [
        ("split floor (hand-written struct)", bench_split_floor),
        ("split SplitDeviceQueue pop/push", lambda t: bench_split_lib(t, False)),
        ("split SplitDeviceQueue pop_many/push_many", lambda t: bench_split_lib(t, True)),
        ("packed floor (hand-written struct)", bench_packed_floor),
        ("packed PackedDeviceQueue pop/push", bench_packed_lib),
    ]
    results: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(args.runs):  # interleaved, so drift hits every case alike
        for name, fn in cases:
            results[name].append(fn(args.chains))
    pin = "unpinned" if args.no_pin else "pinned to CPU 0"
    pin += ", thread CPU time" if args.cpu_time else ", wall clock"
    print(f"device pop+push of a 2-descriptor chain, {args.chains} chains x {args.runs} runs, "
          f"{pin}, Python {sys.version.split()[0]}")
    print(f"{'case':44} {'chains/s median [min-max]':>32} {'vs floor':>9}")
    floors = {"split": statistics.median(results[cases[0][0]]),
              "packed": statistics.median(results[cases[3][0]])}
    for name, _ in cases:
        v = results[name]
        med = statistics.median(v)
        ratio = med / floors[name.split()[0]]
        print(f"{name:44} {med:12,.0f} [{min(v):,.0f}-{max(v):,.0f}] {ratio:8.2f}x")


if __name__ == "__main__":
    main()
