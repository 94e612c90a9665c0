"""virtiofs: the FUSE wire protocol and the virtio-fs transport in pure Python.

Layers (each imports only those below it): ``virtiofs.protocol`` (sans-I/O wire format),
``virtiofs.virtqueue`` (rings in shared memory), ``virtiofs.dax`` (the DAX window),
``virtiofs.server`` (Filesystem API, session, MemoryFS, PassthroughFS), ``virtiofs.transport``
(/dev/fuse, vhost-user, loopback) and ``virtiofs.client`` (the driver side).
"""

from .errors import FuseError, LocalProtocolError, ProtocolError, VirtiofsError

__version__ = "0.1.0"

__all__ = ["FuseError", "LocalProtocolError", "ProtocolError", "VirtiofsError", "__version__"]
