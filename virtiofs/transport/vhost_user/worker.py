"""The thread that serves one virtqueue of a vhost-user-fs device.

One :class:`QueueWorker` per started ring: it waits on the ring's kick eventfd, pops descriptor
chains, reads the FUSE request across however many readable descriptors carry it, hands it to
the session, scatters the reply into the writable descriptors, returns the chain with ``len ==
bytes written == out_header.len`` (Linux's virtio-fs check since 68b69fa0edb2: anything else
fails the request with EIO, SECURITY.md B5) and signals the call eventfd when the ring's
notification suppression (EVENT_IDX or flags) says so.

Hostile-driver rules (SECURITY.md B2, B6 items 8, 11, 17): a chain the queue cannot parse is
returned at once with length 0 (cloud-hypervisor#8401: a head never returned stalls the queue);
a request with a bad header is returned with length 0, or with an ``-EIO`` reply when its
header is readable and there is room for one; ring-level corruption marks the queue broken
(QEMU "stop virtqueue processing if device is broken"): the worker stops serving it, signals
the error eventfd, and the daemon and the other queues go on. Nothing a guest writes can raise
out of this thread.

The hiprio queue (index 0) carries only FORGET, BATCH_FORGET and INTERRUPT (virtio spec 5.11.6.1;
virtiofsd ``HIPRIO_QUEUE_EVENT``): anything else there is answered ``-EINVAL`` without reaching
the filesystem, and since it has its own thread it is never stalled behind request queues.

Threads: the worker owns its queue object and serves requests inline, except the opcodes in
``pooled`` (SETLKW by default: it may wait for an unlock that arrives on the same queue; all of
them with ``--thread-pool-size``), which go to ``pool`` and complete out of order from its
threads; ring accesses are therefore done under ``lock``. Every wait is bounded
(1 s poll): a worker also re-checks its ring on a timeout, so a lost kick delays, never hangs.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Executor
from typing import Protocol, TypeAlias

from virtiofs.errors import DescriptorChainError, ProtocolError, VirtqueueBrokenError
from virtiofs.protocol import Opcode
from virtiofs.server.dispatch import WorkerPool, is_unlock
from virtiofs.virtqueue.chain import DescriptorChain
from virtiofs.virtqueue.packed import PackedDeviceQueue
from virtiofs.virtqueue.split import SplitDeviceQueue

__all__ = ["HIPRIO_OPCODES", "QueueWorker", "RequestHandler"]

log = logging.getLogger("virtiofs.vhost_user")

DeviceQueue: TypeAlias = SplitDeviceQueue | PackedDeviceQueue
ReplyParts: TypeAlias = Sequence[bytes | bytearray | memoryview]

#: Opcodes the hiprio queue may carry (virtio spec: "only FUSE_INTERRUPT, FUSE_FORGET,
#: FUSE_BATCH_FORGET").
HIPRIO_OPCODES = frozenset({int(Opcode.FORGET), int(Opcode.BATCH_FORGET), int(Opcode.INTERRUPT)})

_IN_HEADER_PREFIX = struct.Struct("<IIQ")  # len, opcode, unique: the first 16 bytes
_U32 = struct.Struct("<I")
_INIT = int(Opcode.INIT)
_SETLKW = int(Opcode.SETLKW)
#: Largest request accepted when the handler does not say (1 MiB of WRITE data + headroom).
DEFAULT_MAX_REQUEST = (1 << 20) + (1 << 16) + 4096
_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
_OUT_HEADER_SIZE = _OUT_HEADER.size
_IN_HEADER_SIZE = 40
_POLL_MS = 1000
# Chains served between two looks at the stop flag and the call fd when the guest keeps the
# ring full; bounds how long a stop request waits behind a busy queue.
_BATCH = 256


def _scatter(bufs: list[memoryview], parts: list[bytes | bytearray | memoryview]) -> int:
    """Write ``parts`` one after the other across the writable buffers ``bufs`` (which the
    caller checked are large enough); the bytes written.

    Linux offers ``out_header`` (16 B), the out-args area and page buffers as separate
    descriptors, so a reply always spans several buffers: a tight loop here instead of a
    general stream object (measured ~2x cheaper per small reply).
    """
    bi = 0
    buf = bufs[0]
    room = len(buf)
    off = 0
    total = 0
    for part in parts:
        plen = len(part)
        total += plen
        pos = 0
        while pos < plen:
            while not room:
                bi += 1
                buf = bufs[bi]
                room = len(buf)
                off = 0
            k = plen - pos
            if k > room:
                k = room
            if pos == 0 and k == plen:
                buf[off:off + k] = part
            else:
                buf[off:off + k] = memoryview(part)[pos:pos + k]
            off += k
            room -= k
            pos += k
    return total


class RequestHandler(Protocol):
    """What a worker needs from the FUSE session: ``Session.handle``."""

    def handle(self, request: bytes) -> ReplyParts | None: ...


class _CallFd:
    """The ring's call (and error) eventfds, replaceable while the worker runs.

    QEMU re-sends SET_VRING_CALL on a running ring (vhost-user-capture.txt lines 36-37). The
    old fd is closed under the same lock the worker signals under, so the worker can never
    write into an fd number the process has meanwhile reused for something else.
    """

    __slots__ = ("lock", "call", "err")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.call = -1
        self.err = -1

    def signal(self) -> None:
        with self.lock:
            fd = self.call
            if fd >= 0:
                try:
                    os.eventfd_write(fd, 1)
                except OSError as e:  # full counter (EAGAIN) or a bad fd from the peer
                    log.debug("call eventfd write failed: %s", e)

    def signal_error(self) -> None:
        with self.lock:
            fd = self.err
            if fd >= 0:
                try:
                    os.eventfd_write(fd, 1)
                except OSError as e:
                    log.debug("error eventfd write failed: %s", e)

    def replace(self, which: str, fd: int) -> None:
        with self.lock:
            old = getattr(self, which)
            setattr(self, which, fd)
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        self.replace("call", -1)
        self.replace("err", -1)


class QueueWorker:
    """Serve one started ring until :meth:`stop`.

    ``queue`` is a split or packed device queue already validated against guest memory;
    ``kick_fd`` is borrowed (the device owns and closes it after :meth:`stop`); ``calls`` holds
    the call/error fds. ``hiprio`` restricts the opcodes as the hiprio queue must.
    """

    def __init__(
        self,
        index: int,
        queue: DeviceQueue,
        kick_fd: int,
        calls: _CallFd,
        handler: RequestHandler,
        *,
        hiprio: bool = False,
        pool: Executor | None = None,
        pooled: Collection[int] = (),
        on_broken: Callable[[int, str], None] | None = None,
    ) -> None:
        self.index = index
        self.queue = queue
        self.kick_fd = kick_fd
        self.calls = calls
        self.handler = handler
        self.hiprio = hiprio
        self.pool = pool
        self.pooled = pooled
        max_write = getattr(handler, "max_write", None)
        self.max_request = (max(max_write, 1 << 16) + (1 << 16) + 4096
                            if isinstance(max_write, int) else DEFAULT_MAX_REQUEST)
        self.on_broken = on_broken
        self.lock = threading.Lock()
        self.served = 0
        self.bad_chains = 0
        self._stop = False
        self._detached = False
        self._fd_lock = threading.Lock()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._pending = 0
        self._idle = threading.Condition(self.lock)
        self._thread = threading.Thread(
            target=self._run, name=f"virtiofs-vq{index}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0, pool_timeout: float | None = None) -> bool:
        """Stop serving: finish the chain at hand and wait (``pool_timeout``, default
        ``timeout``) for the requests still on the pool. Returns False if something did not
        end in time; pool requests that finish later are then dropped, never pushed: the
        device may already have handed the ring to a new queue object (or the ring's memory
        back to the front-end)."""
        self._stop = True
        with self._fd_lock:
            if self._stop_fd >= 0:
                os.eventfd_write(self._stop_fd, 1)
        ok = True
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            ok = not self._thread.is_alive()
        if self.pool is not None:
            wait = timeout if pool_timeout is None else pool_timeout
            with self._idle:
                if not self._idle.wait_for(lambda: self._pending == 0, wait):
                    self._detached = True
                    ok = False
        if not self._thread.is_alive():
            self._close_stop_fd()
        return ok

    def _close_stop_fd(self) -> None:
        with self._fd_lock:
            fd, self._stop_fd = self._stop_fd, -1
        if fd >= 0:
            os.close(fd)

    # -- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.kick_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        kick = self.kick_fd
        try:
            # The driver may have made buffers available before the kick fd was handed over
            # (a ring restarted after a memory table change): look before waiting.
            self._drain()
            while not self._stop:
                events = poller.poll(_POLL_MS)
                if self._stop:
                    break
                for fd, ev in events:
                    if fd == kick:
                        if ev & (select.POLLERR | select.POLLNVAL):
                            log.warning("queue %d: kick fd unusable (%#x)", self.index, ev)
                            return
                        try:
                            os.read(kick, 8)
                        except (BlockingIOError, InterruptedError):
                            pass
                self._drain()
        except Exception:  # pragma: no cover - a bug of ours; keep the daemon alive
            log.exception("queue %d worker failed", self.index)
        finally:
            self._close_stop_fd()

    def _drain(self) -> None:
        """Serve every available chain, re-enabling notifications only once the ring is empty
        (vhost's protocol: re-check after enabling, or a kick sent meanwhile is lost)."""
        q = self.queue
        lock = self.lock
        served = 0
        while not self._stop:
            with lock:
                q.disable_notification()
            while served < _BATCH:
                try:
                    with lock:
                        chain = q.pop()
                except DescriptorChainError as e:
                    self.bad_chains += 1
                    log.warning("queue %d: bad descriptor chain: %s", self.index, e)
                    self._complete(e.head, 0)
                    continue
                except VirtqueueBrokenError as e:
                    self._broken(str(e))
                    return
                if chain is None:
                    break
                served += 1
                self._serve(chain)
            if served >= _BATCH:
                # A busy ring: look at the stop flag, then go on without waiting for a kick.
                served = 0
                continue
            with lock:
                more = q.enable_notification()
            if not more:
                return
            served = 0

    def _broken(self, reason: str) -> None:
        log.error("queue %d is broken and stops: %s", self.index, reason)
        self.calls.signal_error()
        if self.on_broken is not None:
            self.on_broken(self.index, reason)
        self._stop = True

    # -- one request ----------------------------------------------------------------------

    def _complete(self, item: DescriptorChain | int, length: int) -> None:
        if self._detached:
            return
        q = self.queue
        # Pool threads complete out of order and concurrently with the queue thread's pops:
        # every ring access is under the lock (uncontended it costs ~0.1 us).
        with self.lock:
            q.push(item, length)
            notify = q.needs_notification()
        if notify:
            self.calls.signal()

    def _submit(self, chain: DescriptorChain, request: bytes, never_block: bool = False) -> None:
        assert self.pool is not None
        with self.lock:
            self._pending += 1
        try:
            if never_block and isinstance(self.pool, WorkerPool):
                # SETLKW may wait for an unlock that arrives on this very queue: blocking the
                # queue thread on a full pool would deadlock the device (issue #6,
                # tests/test_resource_bounds.py).  ENOLCK: fcntl's "lock table full".
                if not self.pool.try_run(self._serve_pooled, chain, request):
                    with self._idle:
                        self._pending -= 1
                        self._idle.notify_all()
                    log.warning("queue %d: worker pool full, SETLKW answered ENOLCK",
                                self.index)
                    self._complete(chain, self._error_reply(chain, errno.ENOLCK, request))
                return
            self.pool.submit(self._serve_pooled, chain, request)
        except RuntimeError:  # pool shut down under us
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
            self._complete(chain, self._error_reply(chain, errno.EIO, request))

    def _serve_pooled(self, chain: DescriptorChain, request: bytes) -> None:
        try:
            self._handle(chain, request)
        finally:
            with self._idle:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.notify_all()

    def _read_request(self, chain: DescriptorChain) -> bytes:
        """Copy the FUSE request out of the readable descriptors (one copy; parse the copy
        only, never guest memory twice). Refuses a readable part shorter than a header, a
        ``len`` outside [header, readable bytes], and anything longer than ``max_request``
        (checked before copying: a guest cannot make us copy its whole RAM)."""
        n = chain.readable_len
        if n < _IN_HEADER_SIZE:
            raise ProtocolError(f"readable part of {n} bytes holds no fuse_in_header", field="len")
        if n > self.max_request:
            chain.read_pos = 0
            head = chain.read(_IN_HEADER_SIZE)
            length = _U32.unpack_from(head)[0]
            if length > self.max_request:
                raise ProtocolError(f"request of {length} bytes exceeds {self.max_request}",
                                    field="len")
            return head + chain.read(max(0, length - _IN_HEADER_SIZE))
        bufs = chain.readable
        data = bufs[0].tobytes() if len(bufs) == 1 else b"".join(bufs)
        length = _U32.unpack_from(data)[0]
        if length != n:
            if length < _IN_HEADER_SIZE or length > n:
                raise ProtocolError(f"fuse_in_header.len {length} but {n} bytes readable",
                                    field="len")
            data = data[:length]
        return data

    def _serve(self, chain: DescriptorChain) -> None:
        self.served += 1
        try:
            request = self._read_request(chain)
        except ProtocolError as e:
            self.bad_chains += 1
            log.warning("queue %d: %s", self.index, e)
            self._complete(chain, self._error_reply(chain, errno.EIO))
            return
        opcode = _IN_HEADER_PREFIX.unpack_from(request)[1]
        if self.hiprio and opcode not in HIPRIO_OPCODES:
            log.warning("queue 0 (hiprio): opcode %d refused", opcode)
            self._complete(chain, self._error_reply(chain, errno.EINVAL, request))
            return
        if opcode == _INIT and not self.hiprio:
            self._new_driver_session()
        if self.pool is not None and opcode in self.pooled:
            if opcode == _SETLKW and is_unlock(request):
                # An unlock never waits, and it may be what ends the waits the pool holds.
                self._handle(chain, request)
            else:
                self._submit(chain, request, never_block=opcode == _SETLKW)
        else:
            self._handle(chain, request)

    def _new_driver_session(self) -> None:
        """A FUSE_INIT on an initialized session: the guest driver restarted (a reboot keeps the
        vhost-user connection; QEMU only stops and restarts the rings). Virtio-fs: "a new INIT
        ends the session" (SPEC.md 2.1), so the old one is closed (``fs.destroy()``) and the
        INIT starts a fresh one instead of being refused as a second INIT."""
        initialized = getattr(self.handler, "initialized", None)
        close = getattr(self.handler, "close", None)
        if isinstance(initialized, threading.Event) and initialized.is_set() and callable(close):
            log.info("queue %d: FUSE_INIT on a live session: the driver restarted", self.index)
            close()

    def _handle(self, chain: DescriptorChain, request: bytes) -> None:
        n = 0
        try:
            reply = self.handler.handle(request)
            if reply is not None:
                n = self._write_reply(chain, reply, request)
        except Exception:
            log.exception("queue %d: request handler failed", self.index)
            n = self._error_reply(chain, errno.EIO, request)
        self._complete(chain, n)

    def _write_reply(self, chain: DescriptorChain, reply: ReplyParts, request: bytes) -> int:
        parts: list[bytes | bytearray | memoryview] = []
        total = 0
        for part in reply:
            if type(part) is memoryview and (part.format != "B" or part.ndim != 1):
                part = part.cast("B")
            total += len(part)
            parts.append(part)
        if total > chain.writable_len or total < _OUT_HEADER_SIZE:
            # The driver lent less room than the reply needs (or the session built no header):
            # the request fails rather than being truncated (the kernel would reject a reply
            # whose out_header.len differs from the used length anyway).
            log.warning("queue %d: reply of %d bytes does not fit %d writable bytes",
                        self.index, total, chain.writable_len)
            return self._error_reply(chain, errno.EIO, request)
        return _scatter(chain.writable, parts)

    def _error_reply(self, chain: DescriptorChain, err: int, request: bytes | None = None) -> int:
        """Write an ``-err`` out_header for the request's unique when it is known and there is
        room; the used length to return (0 when nothing could be written)."""
        if request is None:
            # Only the header may be readable; take unique from a fresh copy of it.
            chain.read_pos = 0
            head = chain.read(16)
            if len(head) < 16:
                return 0
            request = head
        if len(request) < 16 or chain.writable_len < _OUT_HEADER_SIZE:
            return 0
        _len, opcode, unique = _IN_HEADER_PREFIX.unpack_from(request)
        if opcode in (Opcode.FORGET, Opcode.BATCH_FORGET):
            return 0  # never answered, whatever happened
        chain.write_pos = 0
        return chain.write(_OUT_HEADER.pack(_OUT_HEADER_SIZE, -err, unique))
