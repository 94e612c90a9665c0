"""DAX end to end: our client reads and writes file data through a window that our back-end
fills, with no request per access (issue 5, SPEC 1.8/2.1/3.5, SECURITY B1 #13 / B6 #13).

Every scenario runs on two paths:

- ``vhost``: PassthroughFS behind our vhost-user back-end (a thread), our vhost-user front-end
  owning the window (SHMEM_MAP/SHMEM_UNMAP on the back-end channel), the client over the
  front-end's virtqueues;
- ``loopback``: the same filesystem served in-process over the loopback transport's
  virtqueues, the window owned by the client side and handed to the filesystem as a direct
  ``WindowDaxMapper``.

One more run puts the back-end in another process; another one checks that against QEMU's C
virtiofsd (no DAX there) the client falls back to FUSE_READ cleanly. The file data is real
(PassthroughFS over a temporary directory) and every check compares with the host file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtiofs.client import Client
from virtiofs.client.channel import OUT_HEADER_SIZE, SessionChannel
from virtiofs.client.queue_channel import QueueChannel
from virtiofs.dax.window import DaxWindow
from virtiofs.errors import FuseError
from virtiofs.protocol import InitFlags, Opcode, decode_reply, encode_request_parts
from virtiofs.protocol import structs as S
from virtiofs.protocol.constants import SetupMappingFlags
from virtiofs.server.dax import DAX_EXTRA_KEY, FH_NONE, U64_MAX, DaxServer, WindowDaxMapper
from virtiofs.server.filesystem import ConnectionInfo
from virtiofs.server.memfs import MemoryFS
from virtiofs.server.passthrough import PassthroughFS
from virtiofs.server.session import Session
from virtiofs.transport.loopback import LoopbackDriver, LoopbackServer
from virtiofs.transport.vhost_user.dax import (
    SHMEM_PROTOCOL_FEATURE,
    DaxVhostUserBackend,
    DaxVhostUserFsDevice,
    decode_shmem_config,
    encode_shmem_config,
    make_dax_backend,
)
from virtiofs.transport.vhost_user.frontend import Frontend
from virtiofs.transport.vhost_user.messages import ProtocolFeature, ShmemMap

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the passthrough daemon runs as root")

MiB = 1 << 20
RANGE = 2 * MiB
WINDOW = 8 * MiB
READ = int(SetupMappingFlags.READ)
WRITE = int(SetupMappingFlags.WRITE)
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@dataclass
class Env:
    """One running stack: the client, the window it reads, the host directory served."""

    client: Client
    window: DaxWindow
    root: Path
    kind: str
    frontend: Frontend | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    server_unmap: Callable[[int, int], None] | None = None
    """Unmap from the server's side, behind the client's back (SHMEM_UNMAP / window.unmap)."""

    def close(self) -> None:
        for fn in reversed(self.cleanup):
            try:
                fn()
            except Exception:  # teardown must go on
                pass


def _vhost_env(root: Path, window: int, **client_kw: Any) -> Env:
    sock = str(root.parent / "dax.sock")
    fs = PassthroughFS(root)
    be = make_dax_backend(fs, sock)
    env_cleanup: list[Callable[[], None]] = [fs.close, be.close]
    try:
        be.start()
        fe = Frontend.connect(sock, dax_window=window)
        env_cleanup.append(fe.close)
        assert fe.dax is not None
        client = Client(QueueChannel.for_driver(fe), cache="always", dax=True, **client_kw)
        env_cleanup.append(client.close)
    except BaseException:
        for fn in reversed(env_cleanup):
            fn()
        raise

    def server_unmap(moffset: int, length: int) -> None:  # a real SHMEM_UNMAP from the back-end
        device = be.device
        assert isinstance(device, DaxVhostUserFsDevice) and device.dax_mapper is not None
        device.dax_mapper.unmap(moffset, length)

    return Env(client, fe.dax, root, "vhost", fe, env_cleanup, server_unmap)


def _loopback_env(root: Path, window: int, **client_kw: Any) -> Env:
    fs = PassthroughFS(root)
    win = DaxWindow(window)
    driver = LoopbackDriver.create()
    session = Session(fs)
    session.extra[DAX_EXTRA_KEY] = WindowDaxMapper(win)
    server = LoopbackServer(session, driver.setup())
    env_cleanup: list[Callable[[], None]] = [fs.close, win.close, driver.close, server.stop]
    try:
        server.start()
        client = Client(QueueChannel.for_driver(driver), cache="always", dax=win, **client_kw)
        env_cleanup.append(client.close)
    except BaseException:
        for fn in reversed(env_cleanup):
            fn()
        raise
    return Env(client, win, root, "loopback", None, env_cleanup, WindowDaxMapper(win).unmap)


ENVS = {"vhost": _vhost_env, "loopback": _loopback_env}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture(params=sorted(ENVS))
def make_env(request: pytest.FixtureRequest, root: Path) -> Iterator[Callable[..., Env]]:
    made: list[Env] = []

    def make(window: int = WINDOW, **client_kw: Any) -> Env:
        env = ENVS[request.param](root, window, **client_kw)
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()


def window_maps(win: DaxWindow) -> list[str]:
    """The /proc/self/maps lines that lie inside the window (what the kernel really has)."""
    lo, hi = win.address, win.address + win.size
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            a, b = (int(x, 16) for x in line.split()[0].split("-"))
            if a < hi and b > lo:
                out.append(line.strip())
    return out


def raw(client: Client, opcode: Opcode, nodeid: int, arg: Any, items: tuple[Any, ...] = ()) -> int:
    """Send one request as a hostile driver would; the errno of the reply (0 = success)."""
    parts = encode_request_parts(opcode, next(client._unique), nodeid, arg, items=items,
                                 minor=client.conn.minor, flags=int(client.conn.flags))
    client.stats[opcode] += 1
    with client.channel.request(parts, OUT_HEADER_SIZE, timeout=10) as rb:
        return decode_reply(opcode, rb.view, minor=client.conn.minor).error


# ---------------------------------------------------------------------------------- scenarios


def test_reads_after_first_mapping_send_no_request(make_env: Callable[..., Env]) -> None:
    env = make_env()
    data = _data(4 * MiB, 1)
    (env.root / "f").write_bytes(data)
    c = env.client
    assert c.dax is not None
    assert c.conn.flags & InitFlags.MAP_ALIGNMENT and c.conn.map_alignment == 12
    with c.open("/f") as f:
        off = 512 * 1024
        assert f.pread(MiB, off) == data[off:off + MiB]  # first touch: SETUPMAPPING
        assert c.stats[Opcode.SETUPMAPPING] == 1
        before = dict(c.stats)
        for _ in range(100):
            assert f.pread(MiB, off) == data[off:off + MiB]
        assert dict(c.stats) == before, "a read from a mapped range sent a request"
        assert c.stats[Opcode.READ] == 0
        assert c.dax.stats["read_hits"] == 101
    maps = env.window.mappings()
    assert [(m.moffset, m.length, m.foffset, m.writable) for m in maps] == [(0, RANGE, 0, False)]
    if env.frontend is not None:
        assert ("SHMEM_MAP", 0) in env.frontend.backend_requests


def test_read_clamped_to_file_size(make_env: Callable[..., Env]) -> None:
    """A 5000-byte file in a 2 MiB mapping: reads stop at EOF (no SIGBUS past the last page)."""
    env = make_env()
    data = _data(5000, 2)
    (env.root / "small").write_bytes(data)
    (env.root / "empty").write_bytes(b"")
    c = env.client
    with c.open("/small") as f:
        assert f.read() == data
        assert f.pread(RANGE, 4096) == data[4096:]
        assert f.pread(100, 5000) == b""
    with c.open("/empty") as f:
        assert f.read() == b""
    assert c.stats[Opcode.SETUPMAPPING] == 1  # the empty file is never mapped


def test_write_through_window_is_in_host_file(make_env: Callable[..., Env]) -> None:
    env = make_env()
    host = env.root / "w"
    data = bytearray(_data(3 * MiB, 3))
    host.write_bytes(data)
    c = env.client
    with c.open("/w", "r+b") as f:
        f.pread(4096, 0)  # read-only mapping of range 0 first: the write must upgrade it
        patch = _data(10_000, 4)
        assert f.pwrite(patch, RANGE - 5000) == len(patch)  # crosses ranges 0 and 1
        data[RANGE - 5000:RANGE - 5000 + len(patch)] = patch
        assert c.stats[Opcode.WRITE] == 0
        assert c.dax is not None and c.dax.stats["upgrades"] == 1
        # MAP_SHARED over the host file: the bytes are in its page cache at once.
        fd = os.open(host, os.O_RDONLY)
        try:
            assert os.pread(fd, len(patch), RANGE - 5000) == patch
        finally:
            os.close(fd)
        f.fsync()
        # An extending write goes through FUSE_WRITE; the window then serves the new tail.
        tail = _data(3000, 5)
        f.seek(0, os.SEEK_END)
        f.write(tail)
        data += tail
        assert c.stats[Opcode.WRITE] == 1
        assert f.pread(len(data), 0) == bytes(data)
    assert host.read_bytes() == bytes(data)
    assert all(m.writable for m in env.window.mappings() if m.foffset == 0)


def test_small_window_reclaims_and_stays_correct(make_env: Callable[..., Env]) -> None:
    """4 MiB window (2 ranges), 32 MiB file read at random: reclaim on nearly every read."""
    env = make_env(window=4 * MiB)
    data = _data(32 * MiB, 6)
    (env.root / "big").write_bytes(data)
    c = env.client
    rnd = random.Random(7)
    with c.open("/big") as f:
        for _ in range(200):
            off = rnd.randrange(len(data))
            n = rnd.choice([1, 4096, 65536, RANGE + 12345])  # some cross a range boundary
            got = f.pread(n, off)
            assert hashlib.sha256(got).digest() == hashlib.sha256(data[off:off + n]).digest()
        assert c.stats[Opcode.READ] == 0
    assert c.dax is not None and c.dax.stats["reclaims"] > 50
    assert c.stats[Opcode.REMOVEMAPPING] == c.dax.stats["reclaims"]
    assert len(env.window.mappings()) <= 2
    assert c.dax.alloc.nr_busy <= 2


def test_threads_share_a_small_window(make_env: Callable[..., Env]) -> None:
    """Four threads read and write one file through a 2-range window: ranges are set up,
    upgraded and reclaimed under each other's feet; every byte read is the host's."""
    env = make_env(window=4 * MiB)
    data = bytearray(_data(12 * MiB, 12))
    (env.root / "t").write_bytes(data)
    c = env.client
    errors: list[BaseException] = []
    f = c.open("/t", "r+b")

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for i in range(60):
                off = rnd.randrange(len(data) - 70_000)
                if i % 5 == 0:  # each thread writes its own 64 KiB slot, then reads it back
                    slot = seed * 3 * MiB
                    blob = _data(65536, seed * 1000 + i)
                    f.pwrite(blob, slot)
                    assert f.pread(65536, slot) == blob
                else:
                    got = f.pread(70_000, off)
                    lo, hi = off, off + 70_000
                    # Other threads' slots may change under us: compare outside them.
                    for t in range(4):
                        s0, s1 = t * 3 * MiB, t * 3 * MiB + 65536
                        if lo < s1 and hi > s0:
                            break
                    else:
                        assert got == data[lo:hi]
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    f.close()
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in threads)
    assert c.dax is not None and c.dax.stats["reclaims"] > 0
    assert c.stats[Opcode.WRITE] == 0 and c.stats[Opcode.READ] == 0  # waited, never fell back
    assert len(env.window.mappings()) <= 2


def test_forget_and_close_release_ranges(make_env: Callable[..., Env]) -> None:
    env = make_env()
    for name in ("a", "b"):
        (env.root / name).write_bytes(_data(RANGE + 1, 8))
    c = env.client
    for name in ("a", "b"):
        with c.open("/" + name) as f:
            f.read()
    assert len(env.window.mappings()) == 4
    c.drop_caches()  # FORGET of both inodes: REMOVEMAPPING of their ranges first
    assert env.window.mappings() == ()
    assert c.stats[Opcode.REMOVEMAPPING] == 2  # one batch per inode
    with c.open("/a") as f:
        f.pread(10, RANGE)
    assert len(env.window.mappings()) == 1
    c.close()
    assert env.window.mappings() == ()


def test_range_unmapped_behind_the_clients_back(make_env: Callable[..., Env]) -> None:
    """The server side takes a mapped range away without REMOVEMAPPING (a hostile or buggy
    back-end's SHMEM_UNMAP): the client's next access finds the window check failing, falls back
    to FUSE_READ for that access (no SIGSEGV), and maps the range again on the one after."""
    env = make_env()
    data = _data(RANGE + 4096, 11)
    (env.root / "f").write_bytes(data)
    c = env.client
    assert c.dax is not None and env.server_unmap is not None
    with c.open("/f") as f:
        assert f.pread(4096, 100) == data[100:4196]
        env.server_unmap(0, RANGE)
        assert env.window.mappings() == ()
        assert f.pread(4096, 100) == data[100:4196]  # through FUSE_READ
        assert c.dax.stats["lost"] == 1 and c.stats[Opcode.READ] >= 1
        reads = c.stats[Opcode.READ]
        assert f.pread(4096, 200) == data[200:4296]  # mapped again
        assert c.stats[Opcode.READ] == reads and c.stats[Opcode.SETUPMAPPING] == 2
        assert len(env.window.mappings()) == 1


def test_hostile_setupmapping_maps_nothing(make_env: Callable[..., Env]) -> None:
    env = make_env()
    (env.root / "f").write_bytes(_data(RANGE + 100, 9))
    (env.root / "g").write_bytes(b"g" * 8192)
    (env.root / "d").mkdir()
    c = env.client
    win = env.window
    f = c.open("/f", "r+b")
    g = c.open("/g")
    f.pread(10, 0)  # a legitimate mapping at window offset 0
    closed = c.open("/f")
    closed_fh = closed.fh
    closed.close()
    nf, ng = f.nodeid, g.nodeid
    before_maps, before_proc = win.mappings(), window_maps(win)

    def setup(nodeid: int, fh: int, foffset: int, length: int, flags: int,
              moffset: int) -> int:
        return raw(c, Opcode.SETUPMAPPING, nodeid, S.SetupMappingIn(fh, foffset, length, flags,
                                                                    moffset))

    cases = {
        "out of window": setup(nf, FH_NONE, 0, RANGE, READ, WINDOW),
        "window end overflow": setup(nf, FH_NONE, 0, RANGE, READ, WINDOW - 4096),
        "u64 overflow": setup(nf, FH_NONE, 0, RANGE, READ, U64_MAX - 4095),
        "unaligned moffset": setup(nf, FH_NONE, 0, RANGE, READ, RANGE + 512),
        "unaligned foffset": setup(nf, FH_NONE, 100, RANGE, READ, RANGE),
        "unaligned len": setup(nf, FH_NONE, 0, 1000, READ, RANGE),
        "zero len": setup(nf, FH_NONE, 0, 0, READ, RANGE),
        "unknown flags": setup(nf, FH_NONE, 0, RANGE, READ | 4, RANGE),
        "partial overlap": setup(nf, FH_NONE, 0, RANGE, READ, MiB),
        "overlap, longer": setup(nf, FH_NONE, 0, 2 * RANGE, READ, 0),
        "past EOF": setup(nf, FH_NONE, 2 * RANGE, RANGE, READ, RANGE),
        "foffset off_t overflow": setup(nf, FH_NONE, (1 << 63) - 4096, RANGE, READ, RANGE),
        "closed fh": setup(nf, closed_fh, 0, RANGE, READ, RANGE),
        "fh of another inode": setup(nf, g.fh, 0, RANGE, READ, RANGE),
        "unknown fh": setup(nf, 123456, 0, RANGE, READ, RANGE),
        "directory": setup(1, FH_NONE, 0, RANGE, READ, RANGE),
        "unknown nodeid": setup(99999, FH_NONE, 0, RANGE, READ, RANGE),
        "write through read-only fh": setup(ng, g.fh, 0, 8192, READ | WRITE, RANGE),
    }
    expected = {name: errno.EBADF if name in ("closed fh", "fh of another inode", "unknown fh",
                                              "directory", "unknown nodeid") else errno.EINVAL
                for name in cases}
    expected["write through read-only fh"] = errno.EACCES
    assert cases == expected
    assert win.mappings() == before_maps
    assert window_maps(win) == before_proc

    def remove(nodeid: int, *entries: tuple[int, int]) -> int:
        items = tuple(S.RemoveMappingOne(m, n) for m, n in entries)
        return raw(c, Opcode.REMOVEMAPPING, nodeid, S.RemoveMappingIn(len(items)), items)

    assert remove(nf, (RANGE, RANGE)) == errno.EINVAL  # nothing mapped there
    assert remove(nf, (0, MiB)) == errno.EINVAL  # part of a mapping
    assert remove(ng, (0, RANGE)) == errno.EINVAL  # another inode's mapping
    assert remove(nf, (0, RANGE), (0, RANGE)) == errno.EINVAL  # twice
    assert remove(nf) == errno.EINVAL  # no entry
    assert remove(nf, *[(0, RANGE)] * 257) == errno.EINVAL  # more than the kernel's 256
    assert remove(nf, (0, U64_MAX), (0, RANGE)) == errno.EINVAL  # remove-all must be alone
    assert win.mappings() == before_maps and window_maps(win) == before_proc
    # The remove-all length (cloud-hypervisor's) empties the window, nothing else.
    assert remove(nf, (0, U64_MAX)) == 0
    assert win.mappings() == ()
    # The client's allocator still believes range 0 is mapped (a hostile driver lied to its
    # own device); a valid SETUPMAPPING still works afterwards.
    assert setup(nf, FH_NONE, 0, RANGE, READ, 0) == 0
    assert len(win.mappings()) == 1
    f.close()
    g.close()


def test_hostile_setupmapping_readonly_export(root: Path) -> None:
    """A read-only export refuses writable mappings (EROFS) whatever the guest asks."""
    (root / "f").write_bytes(b"x" * 8192)
    win = DaxWindow(WINDOW)
    fs = PassthroughFS(root, readonly=True)
    session = Session(fs)
    session.extra[DAX_EXTRA_KEY] = WindowDaxMapper(win)
    try:
        c = Client(SessionChannel(session), cache="always", dax=win)
        with c.open("/f") as f:
            arg = S.SetupMappingIn(FH_NONE, 0, RANGE, READ | WRITE, 0)
            assert raw(c, Opcode.SETUPMAPPING, f.nodeid, arg) == errno.EROFS
            assert win.mappings() == ()
            assert f.read() == b"x" * 8192  # read-only mappings are fine
        assert len(win.mappings()) == 1
        c.close()
        assert win.mappings() == ()
    finally:
        fs.close()
        win.close()


def test_memoryfs_has_no_dax_and_client_falls_back() -> None:
    """MemoryFS keeps data in Python chunks (no fd to map): SETUPMAPPING is ENOSYS, and the
    client turns DAX off and reads with FUSE_READ."""
    win = DaxWindow(WINDOW)
    session = Session(MemoryFS())
    session.extra[DAX_EXTRA_KEY] = WindowDaxMapper(win)
    try:
        c = Client(SessionChannel(session), cache="always", dax=win)
        with c.open("/m", "wb") as f:
            f.write(b"memory" * 1000)  # extending: FUSE_WRITE, no mapping asked
        assert c.stats[Opcode.SETUPMAPPING] == 0
        with c.open("/m") as f:
            assert f.read() == b"memory" * 1000
            assert f.read() == b""
        assert c.dax is not None and c.dax.disabled
        assert c.stats[Opcode.SETUPMAPPING] == 1 and c.stats[Opcode.READ] >= 1
        assert win.mappings() == ()
        c.close()
    finally:
        win.close()


def test_no_window_means_no_dax(root: Path) -> None:
    """``dax=True`` over a channel without a window: the client works without DAX."""
    (root / "f").write_bytes(b"abc")
    fs = PassthroughFS(root)
    try:
        c = Client(SessionChannel(Session(fs)), cache="always", dax=True)
        assert c.dax is None
        with c.open("/f") as f:
            assert f.read() == b"abc"
        c.close()
    finally:
        fs.close()


# ---------------------------------------------------------------------------------- processes

_BACKEND = textwrap.dedent("""
    import sys
    from virtiofs.server.passthrough import PassthroughFS
    from virtiofs.transport.vhost_user.dax import make_dax_backend
    root, sock, window = sys.argv[1], sys.argv[2], int(sys.argv[3])
    backend = make_dax_backend(PassthroughFS(root), sock, dax_window=window)
    try:
        backend.serve_forever()   # returns when the front-end disconnects
    finally:
        backend.close()
""")


def test_backend_in_another_process(root: Path) -> None:
    """The back-end in its own process: the fds travel over SCM_RIGHTS, the window is ours.

    The back-end is told the window size, so it answers GET_SHMEM_CONFIG with it and the
    front-end sizes its window from that (``dax_window=-1``)."""
    data = _data(6 * MiB, 10)
    (root / "f").write_bytes(data)
    sock = str(root.parent / "proc.sock")
    proc = subprocess.Popen([sys.executable, "-c", _BACKEND, str(root), sock, str(4 * MiB)],
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        with Frontend.connect(sock, dax_window=-1, connect_timeout=20) as fe:
            assert "GET_SHMEM_CONFIG" in fe.log
            assert fe.acked_protocol_features >> SHMEM_PROTOCOL_FEATURE & 1
            assert fe.dax is not None and fe.dax.size == 4 * MiB
            c = Client(QueueChannel.for_driver(fe), cache="always", dax=True)
            with c.open("/f", "r+b") as f:
                assert f.pread(MiB, 100) == data[100:100 + MiB]
                before = c.stats.total()
                for _ in range(100):
                    assert f.pread(MiB, 100) == data[100:100 + MiB]
                assert c.stats.total() == before
                assert f.read() == data  # 3 ranges through a 2-range window
                f.pwrite(b"written by DAX", 5 * MiB)
                assert c.stats[Opcode.WRITE] == 0
                # Out of window, caught by the back-end (it knows the size) before any message.
                maps = fe.dax.mappings()
                arg = S.SetupMappingIn(FH_NONE, 0, RANGE, READ, 4 * MiB)
                assert raw(c, Opcode.SETUPMAPPING, f.nodeid, arg) == errno.EINVAL
                assert fe.dax.mappings() == maps
            assert (root / "f").read_bytes()[5 * MiB:5 * MiB + 14] == b"written by DAX"
            c.close()
            assert fe.dax.mappings() == ()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.skipif(not os.access(VIRTIOFSD, os.X_OK), reason="QEMU's C virtiofsd not installed")
def test_c_virtiofsd_without_dax_falls_back(tmp_path: Path) -> None:
    """QEMU 7.2's C virtiofsd has no DAX: no SHMEM, SETUPMAPPING answers ENOSYS, and the
    client reads through FUSE_READ with the window left empty."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"c virtiofsd" * 1000)
    sock = tmp_path / "vfsd.sock"
    proc = subprocess.Popen([VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={src}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Frontend.connect(sock, dax_window=WINDOW, connect_timeout=20) as fe:
            assert not fe.acked_protocol_features >> SHMEM_PROTOCOL_FEATURE & 1
            assert "GET_SHMEM_CONFIG" not in fe.log
            c = Client(QueueChannel.for_driver(fe), cache="always", dax=True)
            with c.open("/f") as f:
                assert f.read() == b"c virtiofsd" * 1000
            assert c.dax is not None and c.dax.disabled
            assert c.stats[Opcode.READ] >= 1 and fe.dax is not None and fe.dax.mappings() == ()
            c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# ---------------------------------------------------------------------------------- pieces


def test_shmem_map_payload_layout() -> None:
    """40 bytes, packed: u8 shmid, 7 pad, u64 fd_offset, shm_offset, len, flags (SPEC 3.2)."""
    raw_msg = ShmemMap(0, 0x1000, 0x200000, 0x200000, 1).encode()
    assert len(raw_msg) == 40
    assert raw_msg == (b"\0" * 8 + (0x1000).to_bytes(8, "little") + (0x200000).to_bytes(8, "little")
                       + (0x200000).to_bytes(8, "little") + (1).to_bytes(8, "little"))
    assert int(ProtocolFeature.SHMEM) == 21 == SHMEM_PROTOCOL_FEATURE


def test_shmem_config_codec() -> None:
    enc = encode_shmem_config([8 * MiB])
    assert len(enc) == 8 + 8 * 256
    assert decode_shmem_config(enc) == [8 * MiB]
    assert decode_shmem_config(encode_shmem_config([])) == []
    from virtiofs.errors import VhostUserError
    with pytest.raises(VhostUserError):
        decode_shmem_config(b"\1\0\0\0")
    with pytest.raises(VhostUserError):
        decode_shmem_config((257).to_bytes(4, "little") + bytes(4 + 8 * 256))
    with pytest.raises(VhostUserError):
        decode_shmem_config((3).to_bytes(4, "little") + bytes(4 + 16))  # says 3, carries 2


def test_dax_backend_offers_shmem_only_with_dax(root: Path) -> None:
    """The plain back-end does not offer SHMEM; the DAX one does and hands the session a
    mapper only once SHMEM, BACKEND_REQ and REPLY_ACK are all acked."""
    sock = str(root.parent / "plain.sock")
    fs = PassthroughFS(root)
    be = DaxVhostUserBackend(lambda: Session(fs), sock)
    try:
        be.start()
        with Frontend.connect(sock) as fe:  # no window asked: SHMEM not acked
            assert fe.offered_protocol_features >> SHMEM_PROTOCOL_FEATURE & 1
            assert not fe.acked_protocol_features >> SHMEM_PROTOCOL_FEATURE & 1
            assert be.device is not None and be.device.session is not None
            assert DAX_EXTRA_KEY not in be.device.session.extra  # type: ignore[attr-defined]
            c = Client(QueueChannel.for_driver(fe), cache="always", dax=True)
            assert c.dax is None
            assert not c.conn.flags & InitFlags.MAP_ALIGNMENT
            c.close()
    finally:
        be.close()
        fs.close()


class _Window:
    """A real window and file for the property test (one per test, reused across examples)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="virtiofs-dax-prop-")
        self.path = os.path.join(self.dir, "f")
        with open(self.path, "wb") as fh:
            fh.write(b"p" * (5 * 4096 + 10))
        self.win = DaxWindow(16 * 4096)

    def close(self) -> None:
        self.win.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


_page = st.integers(0, 20).map(lambda n: n * 4096)
_len = st.integers(1, 4).map(lambda n: n * 4096)
_any = st.one_of(_page, st.integers(0, U64_MAX), st.sampled_from([U64_MAX, U64_MAX - 4095, 1]))
# (kind, nodeid, moffset, len, foffset, flags); "existing" removes mapping number ``moffset``
# (modulo the count) with the given node id, so removals often name real mappings.
_op = st.one_of(
    st.tuples(st.just("map"), st.integers(1, 3), _any, _any, _any, st.sampled_from([0, 1, 2, 3, 6])),
    st.tuples(st.just("map"), st.integers(1, 3), _page, _len, _page, st.sampled_from([2, 3])),
    st.tuples(st.just("map"), st.integers(1, 3), st.integers(0, 15).map(lambda n: n * 4096),
              _len, st.integers(0, 5).map(lambda n: n * 4096), st.sampled_from([2, 3])),
    st.tuples(st.just("remove"), st.integers(1, 3), _any, _any, st.just(0), st.just(0)),
    st.tuples(st.just("existing"), st.integers(1, 3), st.integers(0, 7), st.just(0), st.just(0),
              st.just(0)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_op, max_size=25))
def test_dax_server_property(ops: list[tuple[str, int, int, int, int, int]]) -> None:
    """SECURITY B1 #13: any (moffset, len, foffset) is inside the window and page-aligned, or
    refused with an errno; the server's table always equals what the window really maps, and
    no two mappings overlap."""
    w = _Window()
    server = DaxServer(WindowDaxMapper(w.win))

    def open_fd(writable: bool) -> int:
        return os.open(w.path, os.O_RDWR if writable else os.O_RDONLY)

    try:
        for kind, nodeid, a, b, c_, flags in ops:
            if kind == "map":
                arg = S.SetupMappingIn(FH_NONE, c_, b, flags, a)
                try:
                    m = server.setup(nodeid, arg, open_fd)
                except FuseError as e:
                    assert e.errno in (errno.EINVAL, errno.ENOMEM, errno.EACCES)
                else:
                    assert m.moffset % 4096 == 0 and m.length % 4096 == 0 and m.length > 0
                    assert m.end <= w.win.size and m.foffset < 5 * 4096 + 10
                    assert flags & ~3 == 0
            else:
                if kind == "existing":
                    maps = server.mappings()
                    if not maps:
                        continue
                    m = maps[a % len(maps)]
                    a, b = m.moffset, m.length
                    owner = m.nodeid
                try:
                    server.remove(nodeid, [S.RemoveMappingOne(a, b)])
                except FuseError as e:
                    assert e.errno == errno.EINVAL
                    assert kind != "existing" or owner != nodeid
            table = [(m.moffset, m.length, m.foffset, m.writable) for m in server.mappings()]
            real = [(m.moffset, m.length, m.foffset, m.writable) for m in w.win.mappings()]
            assert table == real
            for x, y in zip(table, table[1:], strict=False):
                assert x[0] + x[1] <= y[0]
        lines = window_maps(w.win)
        assert len(lines) >= 1
    finally:
        server.remove_all()
        assert w.win.mappings() == ()
        w.close()


def test_allocator_hit_fast_path() -> None:
    """``DaxRangeAllocator.hit``: only ready ranges, writable ones for writes, LRU touched."""
    from virtiofs.dax.allocator import DaxRangeAllocator

    a = DaxRangeAllocator(2 * RANGE)
    assert a.hit(5, 0) is None
    g0 = a.get_range(5, 0, False)
    assert g0 is not None and a.hit(5, 10) is None  # SETUPMAPPING in flight
    a.setup_done(g0, True)
    assert a.hit(5, 10) == g0.moffset + 10 and a.hit(5, 10, write=True) is None
    g1 = a.get_range(5, RANGE, True)
    assert g1 is not None
    a.setup_done(g1, True)
    assert a.hit(5, RANGE + 1, write=True) == g1.moffset + 1
    assert a.lru_order() == [(5, 0), (5, 1)]
    a.hit(5, 0)
    assert a.lru_order() == [(5, 1), (5, 0)]  # the hit made range 0 the most recent
    assert a.hit(6, 0) is None and a.hit(5, 2 * RANGE) is None


def test_from_conn_advertises_alignment_only_when_offered() -> None:
    win = DaxWindow(WINDOW)
    try:
        for offered, want in ((InitFlags.MAP_ALIGNMENT, 12), (InitFlags(0), 0)):
            conn = ConnectionInfo(major=7, minor=45, kernel_flags=offered, flags=InitFlags(0),
                                  max_readahead=0, max_write=4096, max_pages=1,
                                  extra={DAX_EXTRA_KEY: WindowDaxMapper(win)})
            assert DaxServer.from_conn(conn) is not None
            assert conn.map_alignment == want
            assert bool(conn.flags & InitFlags.MAP_ALIGNMENT) == bool(want)
        conn = ConnectionInfo(major=7, minor=45, kernel_flags=InitFlags.MAP_ALIGNMENT,
                              flags=InitFlags(0), max_readahead=0, max_write=4096, max_pages=1)
        assert DaxServer.from_conn(conn) is None and conn.map_alignment == 0
    finally:
        win.close()
