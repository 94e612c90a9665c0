"""virtiofs: the FUSE wire protocol and the virtio-fs transport in pure Python.

Layers (each imports only those below it): ``virtiofs.protocol`` (sans-I/O wire format),
``virtiofs.virtqueue`` (rings in shared memory), ``virtiofs.dax`` (the DAX window),
``virtiofs.server`` (Filesystem API, session, MemoryFS, PassthroughFS), ``virtiofs.transport``
(/dev/fuse, vhost-user, loopback) and ``virtiofs.client`` (the driver side).
"""

from typing import Any

from .errors import FuseError, LocalProtocolError, ProtocolError, VirtiofsError

__version__ = "0.1.0"

__all__ = ["FuseError", "LocalProtocolError", "ProtocolError", "VirtiofsError", "__version__",
           "serve"]

# Imported on first use: ``import virtiofs`` must stay cheap (the CLI, the protocol layer).
_LAZY = {"serve": "virtiofs.transport.vhost_user"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'virtiofs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
