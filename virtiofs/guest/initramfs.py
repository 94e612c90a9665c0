"""Build the guest initramfs: busybox-static, an ``/init``, and the test script.

The archive is a gzip'ed ``newc`` cpio written in pure Python (no ``cpio`` binary, and device
nodes such as ``/dev/console`` need no root). It is cached by the hash of its uncompressed
content, so the same script (and kernel modules) reuses the same file.

``/init`` mounts proc, sysfs, devtmpfs and a tmpfs on ``/tmp``, loads the kernel modules it was
given (6.1 guests), prints :data:`START_MARKER`, runs ``/test.sh`` with output on the console,
prints ``EXIT_MARKER <status>`` and calls ``poweroff -f``. Variables such as ``VIRTIOFS_TAG``
arrive through the kernel command line (the kernel hands unknown ``NAME=value`` words to init's
environment), so one initramfs serves every tag and parameter set.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path

from ..errors import VirtiofsError
from .kernel import cache_dir

__all__ = [
    "EXIT_MARKER",
    "START_MARKER",
    "CpioWriter",
    "InitramfsError",
    "build_initramfs",
    "find_static_busybox",
    "init_script",
    "static_helper",
]

#: Printed by /init right before the test script's first line.
START_MARKER = "@@VIRTIOFS-GUEST-START@@"
#: Printed by /init after the script, followed by a space and its exit status.
EXIT_MARKER = "@@VIRTIOFS-GUEST-EXIT@@"

#: Bumped whenever the archive layout or /init changes in a way the hash would not see.
_FORMAT = b"virtiofs-initramfs-1"

#: How many built archives the cache keeps.
_KEEP = 64

_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFLNK = 0o120000
_S_IFCHR = 0o020000


class InitramfsError(VirtiofsError):
    """The initramfs cannot be built (no static busybox, bad path, ...)."""


class CpioWriter:
    """A minimal ``newc`` (SVR4, no CRC) cpio archive writer.

    Each header is ``070701`` and thirteen 8-digit hex fields; names are NUL-terminated and
    header+name and data are each padded to 4 bytes; ``TRAILER!!!`` ends the archive (the
    format the kernel's initramfs unpacker reads, ``Documentation/driver-api/early-userspace``).
    Timestamps are 0 so the same content gives the same bytes.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._names: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", *, nlink: int = 1, rdev: int = 0
    ) -> None:
        name = name.strip("/")
        if not name or name in self._names:
            raise InitramfsError(f"cpio: empty or duplicate name {name!r}")
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, 0, len(data),
            0, 0, os.major(rdev), os.minor(rdev), len(encoded), 0,
        )  # fmt: skip
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        """A directory (parents must be added first)."""
        self._entry(name, _S_IFDIR | mode, nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """A regular file with ``data``."""
        self._entry(name, _S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        """A symbolic link to ``target``."""
        self._entry(name, _S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A character device node (``/dev/console`` must exist before init opens it)."""
        self._entry(name, _S_IFCHR | mode, rdev=os.makedev(major, minor))

    def getvalue(self) -> bytes:
        """The archive with its trailer."""
        trailer = CpioWriter()
        trailer._ino = 0
        trailer._entry("TRAILER!!!", 0, nlink=1)
        return b"".join(self._parts + trailer._parts)


def _is_static_elf(data: bytes) -> bool:
    # ELF64 little-endian: a dynamic executable has a PT_INTERP (3) program header.
    if data[:6] != b"\x7fELF\x02\x01" or len(data) < 64:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            return False
        if struct.unpack_from("<I", data, off)[0] == 3:
            return False
    return True


def find_static_busybox(candidates: Iterable[str] = ("/bin/busybox", "/usr/bin/busybox")) -> Path:
    """The statically linked busybox (Debian ``busybox-static``); a dynamic one cannot run alone."""
    seen: list[str] = []
    for candidate in (*candidates, shutil.which("busybox") or ""):
        if candidate and os.path.isfile(candidate):
            with open(candidate, "rb") as f:
                if _is_static_elf(f.read(65536)):
                    return Path(candidate).resolve()
            seen.append(candidate)
    raise InitramfsError(
        f"no statically linked busybox (found {seen or 'none'}): apt-get install busybox-static"
    )


def _applets(busybox: Path) -> list[str]:
    out = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    # Skip the applet named "busybox": a symlink busybox -> busybox is a loop (ELOOP at exec).
    return [p.strip("/") for p in out.split() if p and os.path.basename(p) != "busybox"]


def init_script(modules: Sequence[str] = ()) -> str:
    """The ``/init`` shell script; ``modules`` are module names to insmod in that order."""
    load = "".join(
        f'insmod /lib/modules/{m}.ko || echo "init: insmod {m} failed"\n' for m in modules
    )
    return f"""#!/bin/sh
# Generated by virtiofs.guest.initramfs.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
{load}cd /
echo "{START_MARKER}"
/bin/sh /test.sh </dev/null 2>&1
status=$?
echo "{EXIT_MARKER} $status"
sync
poweroff -f
"""


def static_helper(name: str = "vfs-xattr", *, cache: Path | None = None) -> Path | None:
    """Compile ``scripts/<name>.c`` into a static binary for the guest, cached by source hash.

    Returns None when no C compiler with a static libc is available: callers leave the
    helper out and the guest suite reports SKIP for what needs it.
    """
    source = resources.files(__package__).joinpath("scripts", f"{name}.c").read_bytes()
    root = (cache if cache is not None else cache_dir()) / "helpers"
    out = root / f"{name}-{hashlib.sha256(source).hexdigest()[:16]}"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        src = Path(tmp) / f"{name}.c"
        src.write_bytes(source)
        binary = Path(tmp) / name
        try:
            done = subprocess.run(
                [cc, "-static", "-Os", "-s", "-o", str(binary), str(src)],
                capture_output=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0 or not _is_static_elf(binary.read_bytes()[:65536]):
            return None
        os.replace(binary, out)
    return out


def build_initramfs(
    script: str,
    *,
    modules: Sequence[Path] = (),
    extra_files: Mapping[str, Path | bytes] | None = None,
    busybox: Path | None = None,
    cache: Path | None = None,
) -> Path:
    """Build (or reuse) the gzip'ed initramfs running ``script`` and return its path.

    ``modules`` are uncompressed ``.ko`` files loaded in order (see ``GuestKernel.modules``);
    ``extra_files`` maps absolute guest paths to host files or bytes, installed executable
    (for helpers such as ``/bin/vfs-xattr``). The result lives in ``<cache>/initramfs/`` under
    the SHA-256 of its uncompressed content.
    """
    bb = busybox if busybox is not None else find_static_busybox()
    cpio = CpioWriter()
    dirs = {"bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "mnt",
            "root", "etc", "lib", "lib/modules"}  # fmt: skip
    applets = _applets(bb)
    extras = dict(extra_files or {})
    for path in [*applets, *(p.strip("/") for p in extras)]:
        parent = os.path.dirname(path)
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    for d in sorted(dirs):
        cpio.add_dir(d, 0o1777 if d == "tmp" else 0o755)
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_chardev("dev/null", 1, 3, 0o666)
    cpio.add_file("bin/busybox", bb.read_bytes(), 0o755)
    for applet in applets:
        if applet.strip("/") not in extras:
            cpio.add_symlink(applet, "/bin/busybox")
    names = []
    for ko in modules:
        name = ko.name.removesuffix(".ko")
        names.append(name)
        cpio.add_file(f"lib/modules/{name}.ko", ko.read_bytes())
    for guest_path, content in sorted(extras.items()):
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        cpio.add_file(guest_path, data, 0o755)
    cpio.add_file("init", init_script(names).encode(), 0o755)
    cpio.add_file("test.sh", script.encode(), 0o755)
    raw = cpio.getvalue()

    digest = hashlib.sha256(_FORMAT + raw).hexdigest()
    folder = (cache if cache is not None else cache_dir()) / "initramfs"
    out = folder / f"{digest[:32]}.cpio.gz"
    if out.exists():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".build-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(gzip.compress(raw, compresslevel=6, mtime=0))
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _prune(folder, keep=_KEEP)
    return out


def _prune(folder: Path, keep: int) -> None:
    # Every distinct script is about 1 MB compressed; keep the most recently built ones.
    try:
        built = sorted(folder.glob("*.cpio.gz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in built[keep:]:
            old.unlink()
    except OSError:
        pass
