"""Kick and call notifications as eventfds (what vhost-user ``SET_VRING_KICK``/``CALL`` pass).

The driver writes the kick eventfd when ``needs_kick()`` says so; the device writes the call
eventfd when ``needs_notification()`` says so. An eventfd is a counter: several writes before a
read coalesce into one wake-up, which is exactly the virtio notification semantics.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable

from virtiofs.errors import LocalProtocolError

__all__ = ["DEFAULT_POLL_LIMIT", "AdaptivePoll", "EventFd"]

DEFAULT_POLL_LIMIT = 50e-6
"""Seconds a side busy-polls its ring before sleeping on an eventfd: about one cross-vCPU
wake-up on these machines (FACTS.md: ~50 µs), the same order as vhost-net's busyloop_timeout."""

# After this many polls in a row found nothing, polling pauses: first for one wait, then for
# twice as many each time it fails again, up to _MAX_PAUSE waits.
_MISSES = 2
_MAX_PAUSE = 1024


class AdaptivePoll:
    """Bounded busy-polling of a ring before sleeping on its eventfd, paused while it fails.

    Polling pays when the peer runs on another CPU: the answer (or the next request) lands
    while we look, and neither the eventfd write nor the sleep and cross-CPU wake-up happen
    (with EVENT_IDX a side that polls leaves its event index stale, so the peer does not even
    notify). When both sides share one CPU it can never pay: the peer cannot run while we
    spin. KVM's halt-polling grows its window when a sleep was short, which is exactly the
    wrong signal on a shared CPU; instead, a poll that finds nothing ``_MISSES`` times in a
    row pauses polling for 1 wait, and each probe after a pause that finds nothing again
    doubles the pause, up to 1024 waits (exponential back-off); a poll that finds work ends
    the back-off. On a shared CPU this costs one failed poll per 1024 waits.
    ``limit = 0`` (or a single-CPU machine) never polls.
    """

    __slots__ = ("limit", "hits", "misses", "_fails", "_pause", "_backoff")

    def __init__(self, limit: float = DEFAULT_POLL_LIMIT) -> None:
        self.limit = limit if (os.cpu_count() or 1) > 1 else 0.0
        self.hits = 0
        """Polls that found work (statistics)."""
        self.misses = 0
        """Polls that ran out of time (statistics)."""
        self._fails = 0
        self._pause = 0
        self._backoff = 1

    def poll(self, ready: Callable[[], bool]) -> bool:
        """Call ``ready`` until it returns True (True) or the time limit passes (False);
        returns False at once while polling is paused."""
        if self._pause:
            self._pause -= 1
            return False
        limit = self.limit
        if limit <= 0:
            return False
        clock = time.perf_counter
        deadline = clock() + limit
        while True:
            # perf_counter costs about as much as a ring check: look a few times per reading.
            if ready() or ready() or ready() or ready():
                self.hits += 1
                self._fails = 0
                self._backoff = 1
                return True
            if clock() >= deadline:
                self.misses += 1
                self._fails += 1
                if self._fails >= _MISSES:
                    # Paused; after the pause one more miss is enough to pause again.
                    self._fails = _MISSES - 1
                    self._pause = self._backoff
                    self._backoff = min(self._backoff * 2, _MAX_PAUSE)
                return False


class EventFd:
    """A Linux eventfd (``os.eventfd``), owned unless wrapping a received fd with
    ``owned=False``.

    ``EventFd()`` creates one (non-blocking and close-on-exec by default); ``EventFd(fd=n)``
    wraps an fd received from a peer (vhost-user ancillary data) and takes ownership of it.
    """

    def __init__(
        self, *, fd: int | None = None, nonblocking: bool = True, owned: bool = True
    ) -> None:
        if fd is None:
            flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking else 0)
            fd = os.eventfd(0, flags)
            owned = True
        self._fd = fd
        self._owned = owned

    def fileno(self) -> int:
        """The fd, for ``select``/``selectors``/``pass_fds``/``SCM_RIGHTS``."""
        if self._fd < 0:
            raise LocalProtocolError("eventfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd < 0

    def write(self, value: int = 1) -> None:
        """Add ``value`` to the counter, waking a reader."""
        os.eventfd_write(self.fileno(), value)

    def notify(self) -> None:
        """``write(1)``."""
        os.eventfd_write(self.fileno(), 1)

    def read(self) -> int:
        """Take the counter (0 if nothing was written: never blocks on a non-blocking fd)."""
        try:
            return os.eventfd_read(self.fileno())
        except BlockingIOError:
            return 0

    def wait(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds for a write, then take the counter (0 on timeout)."""
        r, _, _ = select.select([self.fileno()], [], [], timeout)
        if not r:
            return 0
        return self.read()

    def close(self) -> None:
        """Close the fd (if owned); idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0 and self._owned:
            os.close(fd)

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventFd(fd={self._fd})"
