"""Child process of test_virtqueue_process.py: the DRIVER side of a queue in shared memory.

argv: kind mem_fd mem_size kick_fd call_fd qsize desc area1 area2 alloc_base count
It maps the memfd it inherited, sends ``count`` requests (request i = ``payload(i)`` split over
1-3 readable buffers, with 1-3 writable buffers), kicks through an eventfd when the device asks,
sleeps on the call eventfd when it has nothing to reap, and checks every reply is the request
reversed. Prints ``OK <count>`` and exits 0, or exits 1 with a message. Every wait is bounded.
"""

from __future__ import annotations

import random
import sys
import time

from virtiofs.virtqueue import (
    EventFd,
    GuestAllocator,
    GuestMemory,
    PackedDriverQueue,
    PackedLayout,
    SplitDriverQueue,
    SplitLayout,
)

WINDOW = 12


def payload(i: int) -> bytes:
    rnd = random.Random(i)
    return bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300)))


def split3(data: bytes, rnd: random.Random) -> list[bytes]:
    cuts = sorted(rnd.randrange(0, len(data) + 1) for _ in range(rnd.randrange(0, 3)))
    parts, prev = [], 0
    for c in cuts + [len(data)]:
        parts.append(data[prev:c])
        prev = c
    return [p for p in parts if p] or [data]


def main() -> int:
    kind = sys.argv[1]
    fd, size, kick_fd, call_fd, qsize, desc, a1, a2, alloc_base, count = map(int, sys.argv[2:])
    mem = GuestMemory.from_fd(fd, size)
    kick = EventFd(fd=kick_fd)
    call = EventFd(fd=call_fd)
    alloc = GuestAllocator(mem, alloc_base, size - alloc_base)
    drv: SplitDriverQueue | PackedDriverQueue
    if kind == "split":
        drv = SplitDriverQueue(mem, SplitLayout(qsize, desc, a1, a2), alloc, event_idx=True,
                               indirect=True)
    else:
        drv = PackedDriverQueue(mem, PackedLayout(qsize, desc, a1, a2), alloc, event_idx=True,
                                indirect=True)
    drv.disable_interrupts()
    sent = done = kicks = 0
    deadline = time.monotonic() + 60
    while done < count:
        if time.monotonic() > deadline:
            print(f"timeout: sent {sent}, done {done}", flush=True)
            return 1
        while sent < count and drv.outstanding < WINDOW and drv.num_free >= 5:
            rnd = random.Random(sent + 1_000_000)
            req = payload(sent)
            room = len(req) + rnd.randrange(0, 20)
            cut = rnd.randrange(1, room + 1)
            drv.add(split3(req, rnd), [cut, room - cut] if cut < room else [room], token=sent,
                    indirect=rnd.random() < 0.3)
            sent += 1
        if drv.needs_kick():
            kick.write(1)
            kicks += 1
        completions = drv.reap()
        if not completions:
            if not drv.enable_interrupts():  # nothing there: sleep until the device calls
                call.wait(1.0)
            drv.disable_interrupts()
            continue
        for c in completions:
            want = payload(int(c.token))[::-1]  # type: ignore[call-overload]
            if c.error is not None or c.data != want:
                print(f"bad reply for {c.token}: {c.error} {c.data[:16]!r}", flush=True)
                return 1
            done += 1
    print(f"OK {done} kicks={kicks}", flush=True)
    mem.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
