"""Mount a MemoryFS and change it from the server side while it is mounted.

    python examples/memfs_mount.py MOUNTPOINT [--cache auto|always|none]   (as root)

The tree starts with ``README`` (written through the ``Filesystem`` API: its methods are plain
Python calls) and ``clock``, which the server rewrites every second; since the kernel may cache
it (``--cache always`` caches for a day), each update is followed by an ``inval_inode``
notification so readers see the new time at once.  Everything else is an ordinary writable
filesystem.  Runs until unmounted or interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from virtiofs.protocol import ROOT_ID
from virtiofs.protocol.structs import ReleaseIn
from virtiofs.server.filesystem import Context
from virtiofs.server.memfs import MemoryFS
from virtiofs.transport.devfuse import mount

README = b"""This is a MemoryFS served by the virtiofs Python package through /dev/fuse.
Everything here lives in the server's memory and is gone when it stops.
"""


def add_file(fs: MemoryFS, name: bytes, data: bytes, mode: int = 0o644) -> int:
    """Create a file through the Filesystem API, as the kernel would (CREATE, WRITE, RELEASE)."""
    ctx = Context()
    entry, handle = fs.create(ctx, ROOT_ID, name, mode, os.O_WRONLY, 0)
    fs.write(ctx, entry.nodeid, handle.fh, 0, memoryview(data), 0)
    fs.release(ctx, entry.nodeid, ReleaseIn(handle.fh))
    fs.forget([(entry.nodeid, 1)])  # the kernel did not take this lookup reference
    return entry.nodeid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--cache", choices=("auto", "always", "none"), default="auto")
    args = parser.parse_args()

    fs = MemoryFS(cache=args.cache)
    add_file(fs, b"README", README, 0o444)
    clock = add_file(fs, b"clock", time.ctime().encode() + b"\n")

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    with mount(fs, args.mountpoint, fsname="memfs") as m:
        print(f"mounted at {m.mountpoint}; Ctrl-C or umount to stop", flush=True)
        # Each pass sleeps one second: stops within a second of a signal or an unmount.
        while not stop.wait(1.0) and not m.ended.is_set():
            fs.write_file("clock", time.ctime().encode() + b"\n")
            m.inval_inode(clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
