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

import functools
import os
import select
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..errors import LocalProtocolError, ReplyError, VirtqueueBrokenError, VirtqueueError
from ..transport.loopback import DriverQueueEnd
from ..virtqueue import DEFAULT_POLL_LIMIT, AdaptivePoll, EventFd, GuestAllocator, GuestMemory
from ..virtqueue.driver import Completion
from .channel import (
    _OPCODE_UNIQUE,
    _OUT_HEAD,
    IN_HEADER_SIZE,
    OUT_HEADER_SIZE,
    Channel,
    ReplyBuffer,
    check_reply_header,
)
from .channel import Buffer as Bytes

__all__ = ["QueueChannel"]

_OUT_UNPACK = _OUT_HEAD.unpack_from

# A waiting thread re-checks its queue at least this often, so a lost wake-up costs a delay,
# never a hang.
_POLL = 1.0
# Requests whose request + reply fit here (nearly all but READ/WRITE/READDIR) reuse blocks of
# this size from a free list instead of the first-fit allocator.
_SMALL_BLOCK = 4096
_POLL_MS = 1000


class _EndState:
    """Per-queue waiting state: the reaper role, the threads waiting for a reply, and the
    reaper's busy-poll state."""

    __slots__ = ("reaper", "waiters", "wlock", "poll")

    def __init__(self, poll_limit: float) -> None:
        self.reaper = threading.Lock()
        self.waiters: set[_Slot] = set()
        self.wlock = threading.Lock()
        self.poll = AdaptivePoll(poll_limit)


class _Slot:
    """One request in flight (the token given to ``DriverQueue.post_pair``) and its buffer.

    Requests whose request + reply fit in ``_SMALL_BLOCK`` (every metadata request) use
    *pooled* slots: a slot keeps its block of guest memory and the view of it for the life of
    the channel, and goes back to a free list when the reply is released, so the hot path
    allocates nothing, translates nothing and builds no object per request. Larger requests
    get a one-off slot over a block from the allocator.
    """

    __slots__ = ("unique", "capacity", "reply_off", "base", "view", "pooled", "release", "end",
                 "state", "done", "length", "error", "event", "abandoned")

    def __init__(self, base: int, view: memoryview, pooled: bool) -> None:
        self.unique = 0
        self.capacity = 0
        self.reply_off = 0
        """Offset of the reply buffer in the block (the request bytes come first)."""
        self.base = base
        """Guest address of the block holding request and reply."""
        self.view = view
        """The whole block."""
        self.pooled = pooled
        self.release: Any = None
        """Gives the slot back (set by the channel; what ``ReplyBuffer.release`` calls)."""
        self.end: Any = None
        self.state: Any = None
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
    ``poll`` is how long (seconds) a lone waiter busy-polls the used ring before sleeping on
    the call eventfd (0: never; see :class:`~virtiofs.virtqueue.AdaptivePoll`).
    """

    def __init__(self, mem: GuestMemory, allocator: GuestAllocator,
                 queues: Sequence[DriverQueueEnd], *, owns: bool = False,
                 on_close: Any = None, poll: float = DEFAULT_POLL_LIMIT) -> None:
        if len(queues) < 2:
            raise LocalProtocolError("a virtio-fs channel needs hiprio and a request queue")
        self.mem = mem
        self.allocator = allocator
        self.queues = list(queues)
        self.hiprio = self.queues[0]
        self.requests = self.queues[1:]
        self._single_end = self.requests[0] if len(self.requests) == 1 else None
        self.owns = owns
        self.on_close = on_close
        self._states = {q.index: _EndState(poll) for q in self.queues}
        self._pollers: dict[int, select.poll] = {}
        for q in self.queues:
            p = select.poll()
            p.register(q.call.fileno(), select.POLLIN)
            self._pollers[q.index] = p
        self._lock = threading.Lock()  # the allocator and every queue operation
        self._broken: Exception | None = None
        self._free_slots: list[_Slot] = []
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
            slot = c[0]  # token
            if type(slot) is not _Slot:
                continue  # hiprio chains: nothing to hand back
            slot.length = c[1]
            if c[3] is not None:  # error: an over-reported used length
                slot.error = c[3]
            slot.done = True
            if slot.abandoned:
                # Nobody waits any more (timed out): the buffers go back now.
                self._put_slot(slot)
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

    def _take_slot(self, total: int) -> _Slot | None:
        """A slot whose block holds ``total`` bytes (caller holds ``_lock``); None when guest
        memory is full."""
        try:
            if total <= _SMALL_BLOCK:
                if self._free_slots:
                    return self._free_slots.pop()
                base = self.allocator.alloc(_SMALL_BLOCK, 64)
                slot = _Slot(base, self.mem.translate(base, _SMALL_BLOCK), True)
            else:
                base = self.allocator.alloc(total, 64)
                slot = _Slot(base, self.mem.translate(base, total), False)
        except LocalProtocolError:
            return None
        # A pooled slot goes back with one list.append (atomic under the GIL, like the
        # list.pop that takes it: no lock, and no Python frame on the release path).
        slot.release = (functools.partial(self._free_slots.append, slot) if slot.pooled
                        else functools.partial(self._release_slot, slot))
        return slot

    def _put_slot(self, slot: _Slot) -> None:
        """Give a slot back (caller holds ``_lock`` for unpooled slots)."""
        if slot.pooled:
            self._free_slots.append(slot)
        else:
            self.allocator.free(slot.base)

    def _release_slot(self, slot: _Slot) -> None:
        with self._lock:
            self._put_slot(slot)

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

    def request(self, parts: Sequence[Bytes], capacity: int, *,
                timeout: float | None = None) -> ReplyBuffer:
        """:meth:`Channel.request` with its common case inline: when no other thread reaps
        this queue, the caller submits, busy-polls or sleeps, reaps and checks its reply
        itself -- no thread hand-off, no Event, no extra frame. Anything else (another
        reaper, a timeout and its INTERRUPT, a reply that fails a check) takes the general
        path (``_finish``, ``_collect``), which does the same checks."""
        head = parts[0]
        if len(head) < IN_HEADER_SIZE:
            raise LocalProtocolError("the first request part must hold the whole in_header")
        opcode, unique = _OPCODE_UNIQUE(head, 4)
        if capacity < OUT_HEADER_SIZE:
            raise LocalProtocolError(f"reply capacity {capacity} < out_header")
        slot = self._submit(parts, capacity, unique)
        st = slot.state
        if slot.done or not st.reaper.acquire(False):
            return self._finish(slot, unique, opcode, timeout)
        try:
            # _reap_until, inline.
            end = slot.end
            queue = end.queue
            has_used = queue.has_used
            ready = has_used()
            if not ready and not st.waiters:
                ready = st.poll.poll(has_used)  # busy-poll (see _reap_until)
            deadline = None
            while not slot.done:
                if ready or has_used():
                    ready = False
                    try:
                        with self._lock:
                            comps = queue.reap()
                            wake = self._complete(comps) if comps else ()
                    except VirtqueueBrokenError as e:
                        self._fail_all(e)
                        break
                    for ev in wake:
                        ev.set()
                    continue
                if deadline is None and timeout is not None:
                    deadline = time.monotonic() + timeout
                if not self._sleep(slot, end, deadline):
                    break
        finally:
            st.reaper.release()
            if st.waiters:
                self._handoff(st)
        if not slot.done:  # the timeout passed: INTERRUPT and the grace period
            return self._finish(slot, unique, opcode, 0.0)
        # _collect, inline for a reply that passes check_reply_header (the queue already
        # refused used lengths above the capacity lent).
        n = slot.length
        if slot.error is None and n >= OUT_HEADER_SIZE:
            off = slot.reply_off
            view = slot.view[off:off + n]
            length, _err, got = _OUT_UNPACK(view)
            if length == n and got == unique:
                return ReplyBuffer(view, slot.release)
        return self._collect(slot)  # raises what the reply breaks

    def _submit(self, parts: Sequence[Bytes], capacity: int, unique: int) -> _Slot:
        req_len = 0
        for p in parts:
            req_len += len(p) if type(p) is not memoryview else p.nbytes
        # One block per request: the request bytes, then (16-aligned) the reply buffer. The
        # request is one readable descriptor, the reply one writable descriptor: a device must
        # treat the chain as a byte stream anyway (SPEC.md 2.1).
        reply_off = (req_len + 15) & ~15
        total = reply_off + capacity
        if total > self.max_reply_size:
            raise LocalProtocolError(f"request of {req_len} + reply of {capacity} bytes exceed "
                                     f"the channel's {self.max_reply_size}")
        end = self._single_end or self._end()
        queue = end.queue
        deadline = 0.0
        while True:
            with self._lock:
                if self._broken is not None or self._closed:
                    self._check_usable()
                free = self._free_slots
                slot: _Slot | None
                slot = free.pop() if total <= _SMALL_BLOCK and free else self._take_slot(total)
                if slot is not None:
                    view = slot.view
                    if len(parts) == 1:
                        view[:req_len] = parts[0]
                    else:
                        pos = 0
                        for p in parts:
                            n = len(p) if type(p) is not memoryview else p.nbytes
                            view[pos:pos + n] = p
                            pos += n
                    slot.unique = unique
                    slot.capacity = capacity
                    slot.reply_off = reply_off
                    if slot.end is not end:
                        slot.end = end
                        slot.state = self._states[end.index]
                    slot.done = slot.abandoned = False
                    slot.error = slot.event = None
                    base = slot.base
                    try:
                        kick = queue.post_pair(base, req_len, base + reply_off, capacity, slot)
                    except LocalProtocolError:
                        self._put_slot(slot)
                        slot = None  # ring full
                    except VirtqueueBrokenError as e:
                        self._put_slot(slot)
                        raise e from None
            if slot is not None:
                break
            # Ring or guest memory full: wait for completions, then retry.
            if not deadline:
                deadline = time.monotonic() + 30.0
            elif time.monotonic() > deadline:
                raise LocalProtocolError("virtqueue or guest memory full for 30 s")
            self._make_progress(end, deadline)
        if kick:
            # EventFd.fileno refuses a closed fd (never a write into a reused fd number).
            os.eventfd_write(end.kick.fileno(), 1)
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
        if slot.done:
            return True
        st = slot.state
        deadline = None if timeout is None else time.monotonic() + timeout
        # The lean path: nobody else reaps this queue, so the caller reaps itself (no thread
        # hand-off, no Event).
        if st.reaper.acquire(False):
            try:
                self._reap_until(slot, slot.end, deadline)
            finally:
                st.reaper.release()
                if st.waiters:
                    self._handoff(st)
            return slot.done
        registered = False
        try:
            while not slot.done:
                if st.reaper.acquire(blocking=False):
                    try:
                        self._reap_until(slot, slot.end, deadline)
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
        has_used = queue.has_used
        # Busy-poll first when we are the only waiter (a spinning thread holds the GIL the
        # others would need): meanwhile used_event stays stale, so the device does not
        # signal the call eventfd either.
        if not has_used() and not slot.state.waiters:
            slot.state.poll.poll(has_used)  # what it found, the loop sees
        lock = self._lock
        while True:
            if has_used():
                # _reap, inline (the hot path).
                try:
                    with lock:
                        comps = queue.reap()
                        wake = self._complete(comps) if comps else ()
                except VirtqueueBrokenError as e:
                    self._fail_all(e)
                    return
                for ev in wake:
                    ev.set()
                if slot.done:
                    return
                continue
            if not self._sleep(slot, end, deadline):
                return

    def _sleep(self, slot: _Slot, end: DriverQueueEnd, deadline: float | None) -> bool:
        """Wait on the call eventfd for a completion; False when the reaper should stop
        (the slot completed another way, or the deadline passed)."""
        # Ask for a call first (EVENT_IDX: used_event = our last used index), then look:
        # a completion that landed meanwhile is seen now, a later one signals the call fd.
        with self._lock:
            more = end.queue.enable_interrupts()
        if more:
            return True
        if slot.done:  # completed by another path (_fail_all)
            return False
        if deadline is None:
            wait = _POLL_MS
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            wait = min(_POLL_MS, int(left * 1000) + 1)
        if self._pollers[end.index].poll(wait):
            try:
                os.eventfd_read(end.call.fileno())
            except BlockingIOError:
                pass
        self._reap(end)
        return not slot.done

    def _collect(self, token: Any) -> ReplyBuffer:
        slot: _Slot = token
        err = slot.error
        if err is not None:
            if isinstance(err, VirtqueueBrokenError):
                raise err
            self._release_slot(slot)
            if isinstance(err, VirtqueueError):
                raise ReplyError(f"used ring: {err.what}", field=err.field) from err
            raise err
        off = slot.reply_off
        # The queue refused used lengths above what was lent (error above): the reply lies
        # inside the slot's block.
        view = slot.view[off:off + slot.length]
        try:
            check_reply_header(view, slot.unique, slot.capacity)
        except BaseException:
            self._release_slot(slot)
            raise
        return ReplyBuffer(view, slot.release)

    def _abandon(self, token: Any) -> None:
        slot: _Slot = token
        with self._lock:
            slot.abandoned = True
            if slot.done:
                self._put_slot(slot)

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
