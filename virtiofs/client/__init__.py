"""The driver side of FUSE: a client that talks to any FUSE server as the Linux kernel does.

- :class:`Client`: INIT, path walk, caches, FORGET, an ``os``-like API and file objects;
- :class:`Channel` and its implementations: :class:`SessionChannel` (an in-process
  ``Session``), :class:`QueueChannel` (a driver virtqueue in shared memory, used by the loopback
  transport and the vhost-user front-end).
"""

from .channel import Channel, ReplyBuffer, RequestTimeout, SessionChannel
from .client import (
    LINUX_INIT_FLAGS,
    CacheMode,
    Client,
    ClientFile,
    DirEntryInfo,
    Negotiated,
    RequestStats,
    stat_result,
)
from .queue_channel import QueueChannel

__all__ = [
    "CacheMode", "Channel", "Client", "ClientFile", "DirEntryInfo", "LINUX_INIT_FLAGS",
    "Negotiated", "QueueChannel", "ReplyBuffer", "RequestStats", "RequestTimeout",
    "SessionChannel", "stat_result",
]
