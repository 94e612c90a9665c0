"""A read-only filesystem with one file: ``python examples/hello.py MOUNTPOINT`` (as root)."""
import errno
import stat
import sys

from virtiofs import FuseError
from virtiofs.protocol import ROOT_ID, DirEntry
from virtiofs.protocol.structs import Attr, AttrOut, EntryOut
from virtiofs.server.filesystem import Filesystem
from virtiofs.transport.devfuse import serve

DATA = b"Hello, world!\n"
ATTRS = {ROOT_ID: Attr(ino=ROOT_ID, mode=stat.S_IFDIR | 0o755, nlink=2),
         2: Attr(ino=2, mode=stat.S_IFREG | 0o444, nlink=1, size=len(DATA))}

class HelloFS(Filesystem):
    def lookup(self, ctx, parent, name):
        if parent != ROOT_ID or name != b"hello":
            raise FuseError(errno.ENOENT)
        return EntryOut(nodeid=2, entry_valid=60, attr_valid=60, attr=ATTRS[2])
    def getattr(self, ctx, ino, fh):
        return AttrOut(attr_valid=60, attr=ATTRS[ino])
    def readdir(self, ctx, ino, fh, offset):
        return [DirEntry(1, 1, 4, b"."), DirEntry(1, 2, 4, b".."), DirEntry(2, 3, 8, b"hello")][offset:]
    def read(self, ctx, ino, fh, offset, size):
        return DATA[offset:offset + size]

if __name__ == "__main__":
    sys.exit(serve(HelloFS(), sys.argv[1]))
