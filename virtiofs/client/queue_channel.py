"""A channel through driver virtqueues in shared memory: what a guest's virtio-fs driver does.

Layout (virtio spec 5.11.2, as Linux ``virtio_fs.c`` uses it without the notification queue):
queue 0 is ``hiprio`` (FORGET, BATCH_FORGET, INTERRUPT: readable descriptors only, nothing
written back), queues 1.. are request queues (the in_header and arguments readable, a reply
buffer writable).  Each queue has a kick eventfd (we write it when the device wants a
notification) and a call eventfd (the device writes it when we asked for one).

Requests in flight: any number of threads may wait at once.  Whoever waits first on a queue
becomes its *reaper*: it sleeps on the call eventfd, reaps completions and wakes the threads
whose requests completed; when its own reply is in, it hands the role over.  A lone thread thus
never pays a thread switch (a dedicated completion thread would add one per request, which on
these machines costs as much as the whole round trip — FACTS.md).

Zero copy for replies: each request lends a writable buffer of exactly the reply's capacity
from the guest memory allocator; the reply is handed to the client as a view of that buffer
(:class:`~virtiofs.client.channel.ReplyBuffer`), freed when the client releases it.  READ data
thus goes from the device straight into the driver's buffer and from there into the caller's
buffer, with no Python-level copy in between.

Hostile device (SECURITY.md B2, B6 item 12): the queue layer refuses used ids that name no
outstanding chain (the queue breaks: every waiter gets :class:`VirtqueueBrokenError`, later
requests too) and flags used lengths larger than the buffer lent; the channel then checks the
reply header (length, unique) before anyone reads it.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..errors import LocalProtocolError, ReplyError, VirtqueueBrokenError, VirtqueueError
from ..transport.loopback import DriverQueueEnd
from ..virtqueue import Buffer, EventFd, GuestAllocator, GuestMemory
from ..virtqueue.driver import Completion
from .channel import Buffer as Bytes
from .channel import Channel, ReplyBuffer, check_reply_header

__all__ = ["QueueChannel"]

# A waiting thread re-checks its queue at least this often, so a lost wake-up costs a delay,
# never a hang.
_POLL = 1.0
# Requests whose request + reply fit here (nearly all but READ/WRITE/READDIR) reuse blocks of
# this size from a free list instead of the first-fit allocator.
_SMALL_BLOCK = 4096
_POLL_MS = 1000


class _EndState:
    """Per-queue waiting state: the reaper role and the threads waiting for a reply."""

    __slots__ = ("reaper", "waiters", "wlock")

    def __init__(self) -> None:
        self.reaper = threading.Lock()
        self.waiters: set[_Slot] = set()
        self.wlock = threading.Lock()


class _Slot:
    """One request in flight (the token given to ``DriverQueue.add``)."""

    __slots__ = ("unique", "capacity", "addr", "base", "end", "state", "done", "length",
                 "error", "event", "abandoned")

    def __init__(self, unique: int, capacity: int, end: DriverQueueEnd,
                 state: _EndState) -> None:
        self.unique = unique
        self.capacity = capacity
        self.addr = -1
        """Guest address of the reply buffer."""
        self.base = -1
        """The allocation holding request and reply (what is freed)."""
        self.end = end
        self.state = state
        self.done = False
        self.length = 0
        self.error: Exception | None = None
        self.event: threading.Event | None = None
        self.abandoned = False


class QueueChannel(Channel):
    """FUSE requests through driver virtqueues (see the module docstring).

    ``queues[0]`` is hiprio, ``queues[1:]`` the request queues (a thread always uses the same
    one).  The channel does not own ``mem`` or the queues' eventfds unless ``owns=True``.
    ``on_close`` runs once at :meth:`close` (the front-end stops the device there).
    """

    def __init__(self, mem: GuestMemory, allocator: GuestAllocator,
                 queues: Sequence[DriverQueueEnd], *, owns: bool = False,
                 on_close: Any = None) -> None:
        if len(queues) < 2:
            raise LocalProtocolError("a virtio-fs channel needs hiprio and a request queue")
        self.mem = mem
        self.allocator = allocator
        self.queues = list(queues)
        self.hiprio = self.queues[0]
        self.requests = self.queues[1:]
        self.owns = owns
        self.on_close = on_close
        self._states = {q.index: _EndState() for q in self.queues}
        self._pollers: dict[int, select.poll] = {}
        for q in self.queues:
            p = select.poll()
            p.register(q.call.fileno(), select.POLLIN)
            self._pollers[q.index] = p
        self._lock = threading.Lock()  # the allocator and every queue operation
        self._broken: Exception | None = None
        self._small: set[int] = set()
        self._small_free: list[int] = []
        self._closed = False
        self.max_reply_size = min(allocator.size // 4, 0xFFFF_FFFF)
        self.max_request_size = self.max_reply_size
        self.dax_window: Any = None
        """The device's DAX window (shared-memory region 0), if any: ``Client(dax=True)`` uses
        it (DAX hook, issue 5)."""

    # ---------------------------------------------------------------------------- helpers

    def _end(self) -> DriverQueueEnd:
        reqs = self.requests
        if len(reqs) == 1:
            return reqs[0]
        return reqs[threading.get_ident() % len(reqs)]

    def _check_usable(self) -> None:
        if self._closed:
            raise LocalProtocolError("channel is closed")
        if self._broken is not None:
            raise self._broken

    def _fail_all(self, err: Exception) -> None:
        """The queue broke: every request in flight fails with ``err``."""
        with self._lock:
            if self._broken is None:
                self._broken = err
            slots = []
            for end in self.queues:
                for tok in end.queue.outstanding_tokens():
                    if isinstance(tok, _Slot):
                        slots.append(tok)
        for s in slots:
            if not s.done:
                s.error = err
                s.done = True
                if s.event is not None:
                    s.event.set()

    def _complete(self, comps: list[Completion]) -> list[threading.Event]:
        """Record completions (under ``_lock``); the events to set once the lock is gone."""
        wake = []
        for c in comps:
            slot = c.token
            if not isinstance(slot, _Slot):
                continue  # hiprio chains: nothing to hand back
            slot.length = c.length
            if c.error is not None:
                slot.error = c.error
            slot.done = True
            if slot.abandoned:
                # Nobody waits any more (timed out): the buffers go back now.
                self._release_block(slot.base)
            elif slot.event is not None:
                wake.append(slot.event)
        return wake

    def _reap(self, end: DriverQueueEnd) -> None:
        try:
            with self._lock:
                comps = end.queue.reap()
                wake = self._complete(comps) if comps else ()
        except VirtqueueBrokenError as e:
            self._fail_all(e)
            return
        for ev in wake:
            ev.set()

    def _alloc_block(self, total: int) -> int:
        """A request+reply block (caller holds ``_lock``): metadata requests reuse fixed
        4 KiB blocks from a free list, larger ones come from the allocator's first fit."""
        if total <= _SMALL_BLOCK:
            if self._small_free:
                return self._small_free.pop()
            base = self.allocator.alloc(_SMALL_BLOCK, 64)
            self._small.add(base)
            return base
        return self.allocator.alloc(total, 64)

    def _release_block(self, base: int) -> None:
        """Give a block back (caller holds ``_lock``)."""
        if base in self._small:
            self._small_free.append(base)
        else:
            self.allocator.free(base)

    def _free(self, addr: int) -> None:
        if addr >= 0:
            with self._lock:
                self._release_block(addr)

    def _handoff(self, st: _EndState) -> None:
        """The reaper leaves: wake every waiter still waiting so one of them takes over."""
        if not st.waiters:
            return
        with st.wlock:
            waiting = [s for s in st.waiters if not s.done]
        for s in waiting:
            if s.event is not None:
                s.event.set()

    # ---------------------------------------------------------------------------- requests

    def _submit(self, parts: Sequence[Bytes], capacity: int, unique: int) -> _Slot:
        self._check_usable()
        req_len = 0
        for p in parts:
            req_len += len(p) if not isinstance(p, memoryview) else p.nbytes
        # One block per request: the request bytes, then (16-aligned) the reply buffer. The
        # request is one readable descriptor, the reply one writable descriptor: a device must
        # treat the chain as a byte stream anyway (SPEC.md 2.1).
        reply_off = (req_len + 15) & ~15
        total = reply_off + capacity
        if total > self.max_reply_size:
            raise LocalProtocolError(f"request of {req_len} + reply of {capacity} bytes exceed "
                                     f"the channel's {self.max_reply_size}")
        end = self._end()
        slot = _Slot(unique, capacity, end, self._states[end.index])
        deadline = 0.0
        while True:
            with self._lock:
                if self._broken is not None or self._closed:
                    self._check_usable()
                try:
                    base = self._alloc_block(total)
                except LocalProtocolError:
                    full = True  # guest memory full: wait for completions, then retry
                else:
                    view = self.mem.translate(base, req_len)
                    pos = 0
                    for p in parts:
                        n = len(p) if not isinstance(p, memoryview) else p.nbytes
                        view[pos:pos + n] = p
                        pos += n
                    slot.addr = base + reply_off
                    slot.base = base
                    try:
                        end.queue.add([Buffer(base, req_len)],
                                      [Buffer(base + reply_off, capacity)], slot, gather=False)
                    except LocalProtocolError:
                        self._release_block(base)
                        full = True  # ring full
                    except VirtqueueBrokenError as e:
                        self._release_block(base)
                        raise e from None
                    else:
                        full = False
                        kick = end.queue.needs_kick()
            if not full:
                break
            if not deadline:
                deadline = time.monotonic() + 30.0
            elif time.monotonic() > deadline:
                raise LocalProtocolError("virtqueue or guest memory full for 30 s")
            self._make_progress(end, deadline)
        if kick:
            end.kick.write(1)  # EventFd refuses a closed fd (never a reused fd number)
        return slot

    def _make_progress(self, end: DriverQueueEnd, deadline: float) -> None:
        """Used while the ring is full: reap, or wait for the reaper to."""
        st = self._states[end.index]
        if st.reaper.acquire(blocking=False):
            try:
                self._reap(end)
                with self._lock:
                    more = end.queue.enable_interrupts()
                if not more:
                    _wait_fd(end.call, min(_POLL, max(0.0, deadline - time.monotonic())))
                self._reap(end)
            finally:
                st.reaper.release()
                self._handoff(st)
        else:
            time.sleep(0.0005)

    def _wait(self, token: Any, timeout: float | None) -> bool:
        slot: _Slot = token
        end, st = slot.end, slot.state
        deadline = None if timeout is None else time.monotonic() + timeout
        registered = False
        try:
            while not slot.done:
                if st.reaper.acquire(blocking=False):
                    try:
                        self._reap_until(slot, end, deadline)
                    finally:
                        st.reaper.release()
                        self._handoff(st)
                    return slot.done
                # Someone else reaps this queue: wait to be woken (our reply, or the role).
                if not registered:
                    slot.event = threading.Event()
                    with st.wlock:
                        st.waiters.add(slot)
                    registered = True
                    continue  # re-try the role: the reaper may have left meanwhile
                wait = _POLL if deadline is None else min(_POLL, deadline - time.monotonic())
                if wait <= 0:
                    return slot.done
                assert slot.event is not None
                slot.event.wait(wait)
                slot.event.clear()
            return True
        finally:
            if registered:
                with st.wlock:
                    st.waiters.discard(slot)

    def _reap_until(self, slot: _Slot, end: DriverQueueEnd, deadline: float | None) -> None:
        queue = end.queue
        poller = self._pollers[end.index]
        call = end.call.fileno()
        while True:
            # Ask for a call first (EVENT_IDX: used_event = our last used index), then look:
            # a completion that landed meanwhile is seen now, a later one signals the call fd.
            with self._lock:
                more = queue.enable_interrupts()
            if more:
                self._reap(end)
                if slot.done:
                    return
                continue
            if deadline is None:
                wait = _POLL_MS
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                wait = min(_POLL_MS, int(left * 1000) + 1)
            if poller.poll(wait):
                try:
                    os.eventfd_read(call)
                except BlockingIOError:
                    pass
            self._reap(end)
            if slot.done:
                return

    def _collect(self, token: Any) -> ReplyBuffer:
        slot: _Slot = token
        err = slot.error
        if err is not None:
            if isinstance(err, VirtqueueBrokenError):
                raise err
            self._free(slot.base)
            if isinstance(err, VirtqueueError):
                raise ReplyError(f"used ring: {err.what}", field=err.field) from err
            raise err
        base = slot.base
        try:
            view = self.mem.translate(slot.addr, slot.length)
            check_reply_header(view, slot.unique, slot.capacity)
        except BaseException:
            self._free(base)
            raise
        return ReplyBuffer(view, lambda: self._free(base))

    def _abandon(self, token: Any) -> None:
        slot: _Slot = token
        with self._lock:
            slot.abandoned = True
            if slot.done:
                self._release_block(slot.base)

    @classmethod
    def for_driver(cls, driver: Any, **kwargs: Any) -> QueueChannel:
        """A channel over anything that has ``mem``, ``allocator`` and ``queues`` (a
        ``LoopbackDriver``, a vhost-user ``Frontend``)."""
        channel = cls(driver.mem, driver.allocator, driver.queues, **kwargs)
        channel.dax_window = getattr(driver, "dax", None)  # DAX hook (issue 5)
        return channel

    # ---------------------------------------------------------------------------- hiprio

    def send(self, parts: Sequence[Bytes]) -> None:
        """Put a no-reply request on the hiprio queue (readable buffers only)."""
        self._check_usable()
        end = self.hiprio
        data = b"".join(parts)
        deadline = time.monotonic() + 10.0
        while True:
            with self._lock:
                try:
                    end.queue.reap()  # hiprio completions only give buffers back
                    end.queue.add([data], [], None)
                except LocalProtocolError:
                    kick = False
                    full = True
                except VirtqueueBrokenError as e:
                    raise e from None
                else:
                    full = False
                    kick = end.queue.needs_kick()
            if not full:
                break
            if time.monotonic() > deadline:
                raise LocalProtocolError("hiprio queue full for 10 s")
            with self._lock:
                more = end.queue.enable_interrupts()
            if not more:
                _wait_fd(end.call, 0.1)
        if kick:
            end.kick.write(1)

    def drain(self, timeout: float) -> bool:
        """Wait until the device has returned every hiprio chain (FORGETs are processed on
        their own queue, in parallel with requests: DESTROY must not overtake them)."""
        end = self.hiprio
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._closed or self._broken is not None:
                    return False
                try:
                    end.queue.reap()
                except VirtqueueBrokenError as e:
                    self._broken = e
                    return False
                if not end.queue.outstanding:
                    return True
                more = end.queue.enable_interrupts()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not more:
                _wait_fd(end.call, min(left, _POLL))

    # ---------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Fail waiters, run ``on_close``, and release what the channel owns."""
        if self._closed:
            return
        self._closed = True
        self._fail_all(LocalProtocolError("channel closed"))
        try:
            if self.on_close is not None:
                self.on_close()
        finally:
            if self.owns:
                for end in self.queues:
                    end.close()
                self.mem.close()


def _wait_fd(fd: EventFd, timeout: float) -> None:
    """Sleep until the eventfd is written or ``timeout`` passes, then drain it."""
    try:
        r, _, _ = select.select([fd.fileno()], [], [], max(0.0, timeout))
    except (OSError, ValueError):
        return
    if r:
        fd.read()
