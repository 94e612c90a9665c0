"""The client's INIT, caches, FORGET accounting and INTERRUPT, counted against a real server.

The server is ``Session(MemoryFS())`` in this process (SessionChannel) or behind the loopback
queues (threads); ``client.stats`` counts what the client actually sent and MemoryFS's own
inode table shows what the server was told (lookup counts, opens).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from virtiofs.client import Client, SessionChannel
from virtiofs.client.client import LINUX_INIT_FLAGS
from virtiofs.client.queue_channel import QueueChannel
from virtiofs.errors import FuseError, LocalProtocolError
from virtiofs.protocol import InitFlags, Opcode
from virtiofs.protocol.constants import KERNEL_MINOR_VERSION, ROOT_ID
from virtiofs.server.filesystem import ConnectionInfo, Context
from virtiofs.server.memfs import MemoryFS
from virtiofs.server.session import Session
from virtiofs.transport.loopback import LoopbackDriver, LoopbackServer


def _client(fs: MemoryFS | None = None, **kw: Any) -> tuple[Client, MemoryFS]:
    fs = fs or MemoryFS()
    return Client(SessionChannel(Session(fs)), **kw), fs


def _lookups(fs: MemoryFS) -> int:
    """Lookup references the server holds for non-root inodes."""
    return sum(n.nlookup for ino, n in fs._inodes.items() if ino != ROOT_ID)


# ------------------------------------------------------------------------------ INIT


class _RecordingFS(MemoryFS):
    def init(self, conn: ConnectionInfo) -> None:
        self.seen = conn
        super().init(conn)


def test_init_offers_what_linux_offers() -> None:
    fs = _RecordingFS()
    c, _ = _client(fs)
    seen = fs.seen
    assert (seen.major, seen.minor) == (7, KERNEL_MINOR_VERSION) == (7, 45)
    assert seen.kernel_flags == LINUX_INIT_FLAGS
    # fuse_send_init's fixed list includes these (fs/fuse/inode.c) ...
    for flag in (InitFlags.ASYNC_READ, InitFlags.DO_READDIRPLUS, InitFlags.MAX_PAGES,
                 InitFlags.SETXATTR_EXT, InitFlags.INIT_EXT, InitFlags.HAS_RESEND,
                 InitFlags.REQUEST_TIMEOUT, InitFlags.WRITEBACK_CACHE, InitFlags.SUBMOUNTS):
        assert seen.kernel_flags & flag, flag
    # ... and DAX alignment only with -o dax.
    assert not seen.kernel_flags & InitFlags.MAP_ALIGNMENT
    assert seen.max_readahead == 128 * 1024
    # The client took what the server enabled, and nothing it did not offer.
    assert c.conn.flags == InitFlags(int(fs.init_flags) & int(LINUX_INIT_FLAGS))
    assert c.conn.max_write == Session(MemoryFS()).max_write
    assert c.conn.max_pages == 256
    assert c.stats[Opcode.INIT] == 1


def test_destroy_on_close() -> None:
    fs = MemoryFS()
    session = Session(fs)
    c = Client(SessionChannel(session))
    c.close()
    assert c.stats[Opcode.DESTROY] == 1
    assert session.destroyed
    with pytest.raises(LocalProtocolError):  # a closed client sends nothing more
        c.stat("/")


# ------------------------------------------------------------------------------ attributes


def test_cache_none_sends_getattr_every_time() -> None:
    c, _ = _client(cache="none")
    c.mkdir("/d")
    base = dict(c.stats)
    for _ in range(5):
        c.stat("/d")
    assert c.stats[Opcode.GETATTR] - base.get(Opcode.GETATTR, 0) == 5
    # No entry cache either: every stat looks the name up again.
    assert c.stats[Opcode.LOOKUP] - base.get(Opcode.LOOKUP, 0) == 5


def test_cache_auto_trusts_attributes_for_their_timeout() -> None:
    c, _ = _client(MemoryFS(timeout=1.0), cache="auto")
    c.mkdir("/d")
    c.stat("/d")
    before = c.stats.copy()
    for _ in range(5):
        c.stat("/d")
    assert c.stats[Opcode.GETATTR] == before[Opcode.GETATTR]
    assert c.stats[Opcode.LOOKUP] == before[Opcode.LOOKUP]
    time.sleep(1.05)
    c.stat("/d")
    # Both the entry and the attributes expired: one LOOKUP (which brings attributes).
    assert c.stats[Opcode.LOOKUP] == before[Opcode.LOOKUP] + 1


def test_cache_auto_with_zero_timeouts_asks_each_time() -> None:
    c, _ = _client(MemoryFS(timeout=0.0), cache="auto")
    c.mkdir("/d")
    before = c.stats.copy()
    c.stat("/d")
    c.stat("/d")
    assert c.stats[Opcode.GETATTR] - before[Opcode.GETATTR] == 2


def test_cache_always_ignores_timeouts_until_we_change_something() -> None:
    c, _ = _client(MemoryFS(timeout=0.0), cache="always")
    c.mkdir("/d")
    c.stat("/d")
    before = c.stats.copy()
    for _ in range(3):
        c.stat("/d")
    assert c.stats == before
    c.chmod("/d", 0o700)  # SETATTR brings fresh attributes back
    assert stat.S_IMODE(c.stat("/d").st_mode) == 0o700
    with c.open("/d/f", "w") as f:
        f.write(b"x")
    n = c.stats[Opcode.GETATTR]
    assert c.stat("/d/f").st_size == 1  # our write made the size stale: asked again
    assert c.stats[Opcode.GETATTR] == n + 1


def test_negative_entries_are_cached_for_entry_valid() -> None:
    fs = MemoryFS(timeout=5.0)
    c, _ = _client(fs, cache="auto")
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            c.stat("/missing")
    # MemoryFS answers a miss with nodeid 0 + entry_valid (a cacheable negative entry).
    assert c.stats[Opcode.LOOKUP] == 1
    c.mkdir("/missing")  # our own creation replaces the negative entry
    assert stat.S_ISDIR(c.stat("/missing").st_mode)


# ------------------------------------------------------------------------------ data


def _reads(c: Client) -> int:
    return c.stats[Opcode.READ]


def test_cache_auto_keeps_data_while_open_and_drops_it_at_open() -> None:
    c, _ = _client(MemoryFS(cache="auto"), cache="auto")
    with c.open("/f", "w") as f:
        f.write(os.urandom(100_000))
    with c.open("/f") as f:
        a = f.read()
        n = _reads(c)
        f.seek(0)
        assert f.read() == a
        assert _reads(c) == n  # second read from the client's cache
    with c.open("/f") as f:
        assert f.read() == a
        assert _reads(c) > n  # close-to-open: a new open reads again


def test_cache_always_keeps_data_across_opens() -> None:
    c, _ = _client(MemoryFS(cache="always"), cache="always")
    with c.open("/f", "w") as f:
        f.write(b"z" * 50_000)
    with c.open("/f") as f:
        f.read()
    n = _reads(c)
    for _ in range(3):
        with c.open("/f") as f:
            assert f.read() == b"z" * 50_000
    assert _reads(c) == n


def test_cache_none_reads_every_time() -> None:
    c, _ = _client(MemoryFS(cache="none"), cache="none")
    with c.open("/f", "w") as f:
        f.write(b"q" * 1000)
    with c.open("/f") as f:
        for _ in range(3):
            f.seek(0)
            assert f.read(1000) == b"q" * 1000
    assert _reads(c) == 3


def test_auto_inval_data_when_size_changes_under_us() -> None:
    fs = MemoryFS(cache="auto", timeout=0.0)
    c, _ = _client(fs, cache="auto")
    other = Client(SessionChannel(Session(fs)), cache="none")
    with c.open("/f", "w") as f:
        f.write(b"old")
    with c.open("/f") as f:
        assert f.read() == b"old"
        with other.open("/f", "a") as g:
            g.write(b"-new")
        f.seek(0)
        # Zero attr timeout: the read revalidates, sees another size and drops the pages.
        assert f.read() == b"old-new"


def test_writeback_holds_writes_until_close() -> None:
    fs = MemoryFS()
    c, _ = _client(fs, cache="auto", writeback=True)
    f = c.open("/f", "w")
    for i in range(100):
        f.write(b"%03d," % i)
    assert c.stats[Opcode.WRITE] == 0
    f.close()
    assert c.stats[Opcode.WRITE] == 1  # 100 writes coalesced into one request
    with c.open("/f") as g:
        assert g.read() == b"".join(b"%03d," % i for i in range(100))


def test_writeback_flush_fsync_and_read_your_writes() -> None:
    c, _ = _client(cache="auto", writeback=True)
    with c.open("/f", "w+") as f:
        f.write(b"hello")
        f.seek(0)
        assert f.read() == b"hello"  # held data is written out before a read
        assert c.stats[Opcode.WRITE] == 1
        f.write(b" world")
        f.flush()
        assert c.stats[Opcode.WRITE] == 2
        f.pwrite(b"H", 0)
        f.fsync()
        assert c.stats[Opcode.WRITE] == 3 and c.stats[Opcode.FSYNC] == 1
    with c.open("/f") as f:
        assert f.read() == b"Hello world"


def test_writeback_off_writes_through() -> None:
    c, _ = _client(cache="auto", writeback=False)
    with c.open("/f", "w") as f:
        f.write(b"a")
        f.write(b"b")
        assert c.stats[Opcode.WRITE] == 2


# ------------------------------------------------------------------------------ FORGET


def test_forget_balances_server_lookup_counts() -> None:
    c, fs = _client(cache="none")
    c.makedirs("/a/b/c")
    for i in range(20):
        with c.open(f"/a/b/c/f{i}", "w"):
            pass
    for _ in range(3):
        c.listdir("/a/b/c")  # READDIRPLUS entries are lookup references too
        c.stat("/a/b/c/f3")
    assert _lookups(fs) > 0
    c.drop_caches()
    assert c.stats[Opcode.BATCH_FORGET] >= 1
    assert _lookups(fs) == 0


def test_forget_batches_when_the_inode_table_overflows() -> None:
    c, fs = _client(cache="auto", max_inodes=10, forget_batch=16)
    for i in range(100):
        c.mknod(f"/f{i}")
    assert len(c._inodes) <= 10 + 1
    assert c.stats[Opcode.BATCH_FORGET] >= 4
    assert c.stats[Opcode.FORGET] + c.stats[Opcode.BATCH_FORGET] <= 100 // 16 + 2
    held = sum(i.nlookup for n, i in c._inodes.items() if n != ROOT_ID)
    queued = sum(n for _, n in c._forgets)
    assert _lookups(fs) == held + queued


def test_open_files_keep_their_inode() -> None:
    c, fs = _client(cache="auto")
    with c.open("/f", "w") as f:
        c.drop_caches()
        f.write(b"still fine")
        assert f.stat().st_size == 10
    c.drop_caches()
    assert _lookups(fs) == 0


# ------------------------------------------------------------------------------ INTERRUPT


class _SlowFS(MemoryFS):
    """GETATTR of /slow waits until the request is interrupted, then fails EINTR."""

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> Any:
        slow = self._inodes[ROOT_ID].children.get(b"slow")  # type: ignore[union-attr]
        if slow is not None and ino == slow[0]:
            deadline = time.monotonic() + 10
            while not ctx.interrupted and time.monotonic() < deadline:
                time.sleep(0.005)
            raise FuseError(errno.EINTR)
        return super().getattr(ctx, ino, fh)


@pytest.fixture
def loopback_slow() -> Iterator[LoopbackDriver]:
    driver = LoopbackDriver.create(memory_size=8 << 20)
    # A pool so the hiprio INTERRUPT is served while GETATTR waits.
    with driver, LoopbackServer(Session(_SlowFS()), driver.setup(), workers=4):
        yield driver


def test_interrupt_on_timeout(loopback_slow: LoopbackDriver) -> None:
    c = Client(QueueChannel.for_driver(loopback_slow), cache="none", timeout=30)
    c.channel.interrupt_grace = 8.0  # the server answers EINTR within ms; leave room for load
    c.mkdir("/slow")
    c.timeout = 0.2
    t = time.monotonic()
    with pytest.raises(InterruptedError):
        c.stat("/slow")
    assert time.monotonic() - t < 9
    assert c.stats[Opcode.INTERRUPT] == 1
    c.timeout = 30
    assert stat.S_ISDIR(c.stat("/").st_mode)  # the connection goes on
    c.close()


# ------------------------------------------------------------------------------ threads


def test_many_threads_share_one_queue_channel() -> None:
    driver = LoopbackDriver.create(memory_size=32 << 20, queue_size=16)
    with driver, LoopbackServer(Session(MemoryFS()), driver.setup(), workers=4):
        c = Client(QueueChannel.for_driver(driver), cache="none", timeout=20)
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                c.mkdir(f"/t{k}")
                for i in range(40):
                    data = os.urandom(1000 + i * 97)
                    with c.open(f"/t{k}/f{i}", "w") as f:
                        f.write(data)
                    with c.open(f"/t{k}/f{i}") as f:
                        assert f.read() == data
                assert len(c.listdir(f"/t{k}")) == 40
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors[:3]
        c.close()
