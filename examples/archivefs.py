"""Mount a zip or tar archive read-only.

    python examples/archivefs.py ARCHIVE MOUNTPOINT      (as root; .zip, .tar, .tar.gz, ...)

Directories, regular files and symlinks (tar) with their modes and modification times; files
are read from the archive when opened and kept in memory while open.  The mount is read-only
(MS_RDONLY): the kernel answers writes with EROFS before they reach us.
"""

from __future__ import annotations

import errno
import stat
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count

from virtiofs import FuseError
from virtiofs.protocol import ROOT_ID, DirEntry
from virtiofs.protocol.structs import Attr, AttrOut, EntryOut, Kstatfs, OpenOut, ReleaseIn
from virtiofs.server.filesystem import Context, Filesystem, dirent_type
from virtiofs.transport.devfuse import serve

TIMEOUT = 3600  # the archive never changes: let the kernel cache names and attributes


@dataclass
class Node:
    ino: int
    mode: int
    mtime: int = 0
    size: int = 0
    member: str | None = None
    target: bytes = b""
    children: dict[bytes, int] = field(default_factory=dict)


class ArchiveFS(Filesystem):
    """A read-only view of a zip or tar archive."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()  # tarfile reads share one file object
        self._inos = count(ROOT_ID + 1)
        self.nodes = {ROOT_ID: Node(ROOT_ID, stat.S_IFDIR | 0o755)}
        self._open: dict[int, bytes] = {}
        self._fhs = count(1)
        if zipfile.is_zipfile(path):
            self.zip: zipfile.ZipFile | None = zipfile.ZipFile(path)
            self.tar: tarfile.TarFile | None = None
            for info in self.zip.infolist():
                mode = info.external_attr >> 16 or (0o755 if info.is_dir() else 0o644)
                kind = stat.S_IFDIR if info.is_dir() else stat.S_IFREG
                mtime = int(zipfile_time(info.date_time))
                self._add(info.filename, kind | stat.S_IMODE(mode), mtime, info.file_size,
                          None if info.is_dir() else info.filename)
        elif tarfile.is_tarfile(path):
            self.zip = None
            self.tar = tarfile.open(path)
            for member in self.tar.getmembers():
                if member.isdir():
                    self._add(member.name, stat.S_IFDIR | member.mode, int(member.mtime))
                elif member.issym():
                    self._add(member.name, stat.S_IFLNK | 0o777, int(member.mtime),
                              len(member.linkname), target=member.linkname.encode())
                elif member.isfile() or member.islnk():
                    self._add(member.name, stat.S_IFREG | member.mode, int(member.mtime),
                              member.size, member.name)
        else:
            raise ValueError(f"{path}: neither a zip nor a tar archive")

    def _add(self, name: str, mode: int, mtime: int, size: int = 0, member: str | None = None,
             target: bytes = b"") -> None:
        parts = [p.encode() for p in name.strip("/").split("/") if p not in ("", ".")]
        if not parts or b".." in parts:
            return  # never let an archive name point outside the tree
        parent = self.nodes[ROOT_ID]
        for part in parts[:-1]:  # implicit parent directories
            ino = parent.children.get(part)
            if ino is None:
                ino = next(self._inos)
                self.nodes[ino] = Node(ino, stat.S_IFDIR | 0o755, mtime)
                parent.children[part] = ino
            parent = self.nodes[ino]
        ino = parent.children.get(parts[-1]) or next(self._inos)
        old = self.nodes.get(ino)
        node = Node(ino, mode, mtime, size, member, target, old.children if old else {})
        self.nodes[ino] = node
        parent.children[parts[-1]] = ino

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise FuseError(errno.ENOENT) from None

    def _attr(self, n: Node) -> Attr:
        nlink = 2 + sum(stat.S_ISDIR(self.nodes[c].mode) for c in n.children.values()) \
            if stat.S_ISDIR(n.mode) else 1
        return Attr(ino=n.ino, size=n.size, blocks=(n.size + 511) // 512, atime=n.mtime,
                    mtime=n.mtime, ctime=n.mtime, mode=n.mode, nlink=nlink, blksize=4096)

    def lookup(self, ctx: Context, parent: int, name: bytes) -> EntryOut:
        ino = self._node(parent).children.get(name)
        if ino is None:
            return EntryOut(nodeid=0, entry_valid=TIMEOUT)  # cached negative entry
        return EntryOut(nodeid=ino, entry_valid=TIMEOUT, attr_valid=TIMEOUT,
                        attr=self._attr(self.nodes[ino]))

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> AttrOut:
        return AttrOut(attr_valid=TIMEOUT, attr=self._attr(self._node(ino)))

    def readlink(self, ctx: Context, ino: int) -> bytes:
        return self._node(ino).target

    def opendir(self, ctx: Context, ino: int, flags: int) -> OpenOut:
        if not stat.S_ISDIR(self._node(ino).mode):
            raise FuseError(errno.ENOTDIR)
        return OpenOut(0)

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int) -> Iterator[DirEntry]:
        rows = [(b".", ino, stat.S_IFDIR), (b"..", ino, stat.S_IFDIR)] + [
            (name, child, self.nodes[child].mode) for name, child in
            sorted(self._node(ino).children.items())]
        for cookie, (name, child, mode) in enumerate(rows[offset:], offset + 1):
            yield DirEntry(child, cookie, dirent_type(mode), name)

    def open(self, ctx: Context, ino: int, flags: int, open_flags: int) -> OpenOut:
        n = self._node(ino)
        if n.member is None:
            raise FuseError(errno.EISDIR)
        with self._lock:
            if self.zip is not None:
                data = self.zip.read(n.member)
            else:
                assert self.tar is not None
                extracted = self.tar.extractfile(n.member)
                data = extracted.read() if extracted is not None else b""
        fh = next(self._fhs)
        self._open[fh] = data
        return OpenOut(fh)

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes:
        return self._open[fh][offset:offset + size]

    def release(self, ctx: Context, ino: int, arg: ReleaseIn) -> None:
        self._open.pop(arg.fh, None)

    def statfs(self, ctx: Context, ino: int) -> Kstatfs:
        total = sum(n.size for n in self.nodes.values())
        return Kstatfs(blocks=(total + 4095) // 4096, files=len(self.nodes), bsize=4096,
                       frsize=4096, namelen=255)


def zipfile_time(date_time: tuple[int, int, int, int, int, int]) -> float:
    import time
    return time.mktime((*date_time, 0, 0, -1))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(serve(ArchiveFS(sys.argv[1]), sys.argv[2], fsname=sys.argv[1], read_only=True))
