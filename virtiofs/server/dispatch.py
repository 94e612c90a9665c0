"""Running ``Session.handle`` for a transport: inline, or on a bounded worker pool.

A transport (the /dev/fuse readers, a vhost-user queue worker, the loopback device) reads a
request, gives it to ``Dispatcher.dispatch`` with a ``reply(parts)`` callable, and goes on.

Most requests are served inline, in the transport's own thread: a handoff to another thread
costs a futex wake-up and a GIL handoff (measured by benchmarks/devfuse.py ``--pool all``),
which doubles the cost of a metadata round trip on the 2-vCPU machines of FACTS.md.  Requests
that may wait without bound — SETLKW waits for another process to unlock — go to a
``WorkerPool`` instead, so a reader is never stuck behind a lock and the unlock can still be
read (libfuse solves the same problem by spawning threads on demand).  ``pooled=ALL`` sends
everything to the pool (the C virtiofsd's model; Rust virtiofsd's default is inline).

The pool is bounded: ``workers`` threads and a queue of ``queue_size`` requests; ``run`` blocks
while the queue is full, which pushes back on the transport (and through it on the kernel or
the guest) instead of growing memory.  The filesystem's own syscalls release the GIL, so
several workers overlap their I/O.  ``WorkerPool`` is also a ``concurrent.futures.Executor``,
for transports that want futures.
"""

from __future__ import annotations

import errno
import logging
import queue
import struct
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from ..protocol.codec import encode_error
from ..protocol.constants import Opcode
from .session import Buffer, ReplyParts, Session, request_opcode

__all__ = ["ALL", "DEFAULT_POOLED", "Dispatcher", "WorkerPool"]

log = logging.getLogger("virtiofs.dispatch")

T = TypeVar("T")

DEFAULT_POOLED: frozenset[int] = frozenset({int(Opcode.SETLKW)})
"""Opcodes served on the pool by default: those that may wait without bound."""


class _All(frozenset[int]):
    """Every opcode (``pooled=ALL``)."""

    def __contains__(self, item: object) -> bool:
        return True


ALL: frozenset[int] = _All()

_UNBOUNDED_WAIT = frozenset({int(Opcode.SETLKW)})
"""Pooled opcodes that never wait for room in the pool: they answer ENOLCK when it is full."""
_UNIQUE = struct.Struct("<Q")


_LK_TYPE = struct.Struct("<I")
_LK_TYPE_OFFSET = 40 + 8 + 8 + 8 + 8
"""fuse_lk_in.lk.type: in_header, fh, owner, lk.start, lk.end."""
_F_UNLCK = 2


def _unique(request: Buffer) -> int:
    return int(_UNIQUE.unpack_from(request, 8)[0]) if len(request) >= 16 else 0


def is_unlock(request: Buffer) -> bool:
    """Whether a SETLK/SETLKW request releases a lock (``fuse_lk_in.lk.type == F_UNLCK``)."""
    if len(request) < _LK_TYPE_OFFSET + 4:
        return False
    return int(_LK_TYPE.unpack_from(request, _LK_TYPE_OFFSET)[0]) == _F_UNLCK

_NOTHING: frozenset[int] = frozenset()
_EVERY_BYTE = frozenset(range(256))


def _low_bytes(opcodes: Collection[int]) -> frozenset[int]:
    if isinstance(opcodes, _All):
        return _EVERY_BYTE
    return frozenset(int(op) & 0xFF for op in opcodes)


_STOP = object()
_PUT_SLICE = 0.5
"""Seconds between two looks at the shutdown flag while a full queue blocks ``run``."""


class WorkerPool(Executor):
    """``workers`` daemon threads serving a queue of at most ``queue_size`` items."""

    def __init__(self, workers: int = 4, queue_size: int | None = None,
                 name: str = "virtiofs-worker") -> None:
        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        self.workers = workers
        self._queue: queue.Queue[Any] = queue.Queue(queue_size or 4 * workers)
        self._shutdown = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            fn, args, future = item
            if future is None:
                try:
                    fn(*args)
                except Exception:
                    log.exception("pooled call %r failed", fn)
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def _put(self, item: Any) -> None:
        # A full queue blocks the caller (back-pressure), in slices so a shutdown is noticed.
        while True:
            if self._shutdown:
                raise RuntimeError("the worker pool is shut down")
            try:
                self._queue.put(item, timeout=_PUT_SLICE)
                return
            except queue.Full:
                continue

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` without a future (exceptions are logged)."""
        self._put((fn, args, None))

    def try_run(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Queue ``fn(*args)`` (no future) if there is room now; False when the queue is full."""
        if self._shutdown:
            raise RuntimeError("the worker pool is shut down")
        try:
            self._queue.put_nowait((fn, args, None))
        except queue.Full:
            return False
        return True

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """``Executor.submit``; blocks while the queue is full."""
        future: Future[T] = Future()
        if kwargs:
            self._put((lambda: fn(*args, **kwargs), (), future))
        else:
            self._put((fn, args, future))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False,
                 timeout: float = 10.0) -> None:
        """Stop the workers once the queue is drained; wait at most ``timeout`` seconds."""
        if self._shutdown:
            return
        self._shutdown = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP and item[2] is not None:
                    item[2].cancel()
        for _ in self._threads:
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                log.warning("worker pool queue still full at shutdown")
                break
        if wait:
            for t in self._threads:
                t.join(timeout)

    @property
    def alive(self) -> int:
        """Worker threads still running."""
        return sum(t.is_alive() for t in self._threads)


class Dispatcher:
    """Feeds a transport's requests to ``session`` and its replies back to the transport.

    ``pool`` serves the opcodes in ``pooled`` (default: SETLKW); without a pool everything
    runs inline.  Transport-neutral: the transport supplies the ``reply`` callable.

    A transport's hot loop may skip ``dispatch`` for the requests served inline: those whose
    byte 4 (the opcode's low byte) is not in ``pooled_low`` (see ``pooled_low``).
    """

    def __init__(self, session: Session, pool: WorkerPool | None = None, *,
                 pooled: Collection[int] = DEFAULT_POOLED) -> None:
        self.session = session
        self._handle = session.handle
        self._pool = pool
        self.pooled = pooled

    @property
    def pool(self) -> WorkerPool | None:
        """The worker pool (None: everything inline)."""
        return self._pool

    @pool.setter
    def pool(self, pool: WorkerPool | None) -> None:
        self._pool = pool
        self.pooled_low = _low_bytes(self._pooled) if pool is not None else _NOTHING

    @property
    def pooled(self) -> Collection[int]:
        """Opcodes served on the pool (when there is one)."""
        return self._pooled

    @pooled.setter
    def pooled(self, pooled: Collection[int]) -> None:
        self._pooled = pooled
        self.pooled_low = _low_bytes(pooled) if self._pool is not None else _NOTHING

    pooled_low: frozenset[int]
    """Low bytes of the opcodes that may go to the pool: a request whose ``request[4]`` is not
    in it is served inline, ``session.handle(request)``, with the same result as ``dispatch``
    (a cheap test for a transport's hot loop; false positives just take ``dispatch``)."""

    def dispatch(self, request: Buffer, reply: Callable[[ReplyParts], None], *,
                 owned: bool = False) -> None:
        """Serve ``request`` and call ``reply(parts)`` when a reply is due.

        ``owned``: the request buffer stays valid after this call returns (otherwise it is
        copied before going to the pool, since transports reuse their read buffers).
        """
        pool = self._pool
        if pool is not None:
            opcode = request_opcode(request)
            if opcode in self._pooled:
                self._to_pool(pool, opcode, request, reply, owned)
                return
        parts = self._handle(request)
        if parts is not None:
            reply(parts)

    def _to_pool(self, pool: WorkerPool, opcode: int, request: Buffer,
                 reply: Callable[[ReplyParts], None], owned: bool) -> None:
        item = request if owned else bytes(request)
        if opcode in _UNBOUNDED_WAIT:
            if is_unlock(request):
                # An unlock (Python's lockf sends F_UNLCK with F_SETLKW) never waits: serve
                # it here, it may be what ends the waits the pool is full of.
                parts = self._handle(request)
                if parts is not None:
                    reply(parts)
                return
            if not pool.try_run(self._serve, item, reply):
                # Blocking this reader on a full pool could leave no reader for the unlock
                # that ends the waits: the mount would freeze (tests/test_resource_bounds.py
                # ..._lock_waiters_beyond_the_pool...).  ENOLCK: fcntl's "lock table full".
                log.warning("worker pool full: answering SETLKW with ENOLCK")
                reply([encode_error(_unique(request), errno.ENOLCK)])
            return
        pool.run(self._serve, item, reply)

    def _serve(self, request: Buffer, reply: Callable[[ReplyParts], None]) -> None:
        parts = self._handle(request)
        if parts is not None:
            reply(parts)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the pool (after what is queued has been served)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, timeout=timeout)
