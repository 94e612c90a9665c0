"""Kick and call notifications as eventfds (what vhost-user ``SET_VRING_KICK``/``CALL`` pass).

The driver writes the kick eventfd when ``needs_kick()`` says so; the device writes the call
eventfd when ``needs_notification()`` says so. An eventfd is a counter: several writes before a
read coalesce into one wake-up, which is exactly the virtio notification semantics.
"""

from __future__ import annotations

import os
import select

from virtiofs.errors import LocalProtocolError

__all__ = ["EventFd"]


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
