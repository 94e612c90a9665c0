"""DaxRangeAllocator: the fs/fuse/dax.c range policy against a model, and driving a real
DaxWindow over real files with a window smaller than the working set (SPEC 1.8)."""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from virtiofs.dax.allocator import (
    FH_NONE,
    FUSE_DAX_RECLAIM_CHUNK,
    FUSE_DAX_SZ,
    DaxRangeAllocator,
    GrantKind,
    RangeGrant,
    RemoveMapping,
    reclaim_count,
    removemapping_batches,
)
from virtiofs.dax.window import DaxWindow
from virtiofs.errors import LocalProtocolError
from virtiofs.protocol.constants import REMOVEMAPPING_MAX_ENTRY, SetupMappingFlags

SZ = FUSE_DAX_SZ
MiB = 1 << 20


# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    "nr_free,nr_ranges,expected",
    [
        (100, 100, 0),
        (20, 100, 0),  # threshold is "below 20%"
        (19, 100, FUSE_DAX_RECLAIM_CHUNK),
        (0, 4, FUSE_DAX_RECLAIM_CHUNK),  # 20% of 4 rounds to 0; the threshold is at least 1
        (1, 4, 0),
        (102, 512, 0),
        (101, 512, FUSE_DAX_RECLAIM_CHUNK),
    ],
)
def test_background_reclaim_threshold(nr_free: int, nr_ranges: int, expected: int) -> None:
    assert reclaim_count(nr_free, nr_ranges) == expected


def test_removemapping_batches_are_bounded() -> None:
    assert REMOVEMAPPING_MAX_ENTRY == 256
    entries = [(i * SZ, SZ) for i in range(600)]
    batches = removemapping_batches(7, entries)
    assert [b.count for b in batches] == [256, 256, 88]
    assert all(b.nodeid == 7 for b in batches)
    assert [e for b in batches for e in b.entries] == entries
    assert removemapping_batches(7, []) == []


# --------------------------------------------------------------------------- unit behaviour


def _ready(alloc: DaxRangeAllocator, nodeid: int, foffset: int, write: bool = False) -> RangeGrant:
    g = alloc.get_range(nodeid, foffset, write)
    assert g is not None
    if g.setup is not None:
        alloc.setup_done(g, True)
    return g


def test_first_mapping_is_what_linux_sends() -> None:
    alloc = DaxRangeAllocator(4 * SZ)
    g = alloc.get_range(5, 3 * SZ + 100, write=False)
    assert g is not None and g.kind is GrantKind.NEW and g.remove is None
    s = g.setup
    assert s is not None
    # fuse_setup_one_mapping: fh = -1, foffset = idx << 21, len = 2 MiB, READ [| WRITE].
    assert (s.nodeid, s.fh, s.foffset, s.length, s.moffset) == (5, FH_NONE, 3 * SZ, SZ, 0)
    assert s.flags == SetupMappingFlags.READ
    assert alloc.lookup(5, 3 * SZ) is None  # not usable before the reply
    alloc.setup_done(g, True)
    assert alloc.lookup(5, 3 * SZ + 100) == (100, False)
    assert g.window_offset(3 * SZ + 100) == 100
    w = alloc.get_range(5, 0, write=True)
    assert w is not None and w.setup is not None
    assert w.setup.flags == SetupMappingFlags.READ | SetupMappingFlags.WRITE
    assert w.moffset == SZ  # free ranges are taken in window order


def test_hit_needs_no_request() -> None:
    alloc = DaxRangeAllocator(4 * SZ)
    first = _ready(alloc, 1, 0)
    g = alloc.get_range(1, SZ - 1, write=False)
    assert g is not None and g.kind is GrantKind.HIT
    assert g.setup is None and g.remove is None and g.moffset == first.moffset


def test_upgrade_resends_setupmapping_with_write() -> None:
    alloc = DaxRangeAllocator(4 * SZ)
    _ready(alloc, 1, 0)
    up = alloc.get_range(1, 0, write=True)
    assert up is not None and up.kind is GrantKind.UPGRADE and up.setup is not None
    assert up.setup.writable and up.setup.moffset == 0 and up.setup.foffset == 0
    # Readers go on; a second writer waits for the reply.
    reader = alloc.get_range(1, 0, write=False)
    assert reader is not None and reader.kind is GrantKind.HIT
    busy = alloc.get_range(1, 0, write=True)
    assert busy is not None and busy.kind is GrantKind.BUSY and busy.setup is None
    alloc.setup_done(up, False)  # refused: still read-only
    assert alloc.lookup(1, 0) == (0, False)
    up = alloc.get_range(1, 0, write=True)
    assert up is not None and up.kind is GrantKind.UPGRADE
    alloc.setup_done(up, True)
    assert alloc.lookup(1, 0) == (0, True)
    with pytest.raises(LocalProtocolError):
        alloc.setup_done(up, True)  # already answered


def test_failed_setup_returns_the_range() -> None:
    alloc = DaxRangeAllocator(2 * SZ)
    g = alloc.get_range(1, 0, write=False, pin=True)
    assert g is not None
    busy = alloc.get_range(1, 0, write=False)
    assert busy is not None and busy.kind is GrantKind.BUSY
    alloc.setup_done(g, False)
    assert alloc.nr_free == 2 and alloc.lookup(1, 0) is None
    alloc.unpin(g)  # stale: a no-op
    again = alloc.get_range(1, 0, write=False)
    assert again is not None and again.kind is GrantKind.NEW


def test_window_full_reclaims_the_least_recently_used() -> None:
    alloc = DaxRangeAllocator(3 * SZ)
    a, b, c = (_ready(alloc, n, 0) for n in (1, 2, 3))
    _ready(alloc, 1, 0)  # touch 1: LRU order is now 2, 3, 1
    g = alloc.get_range(4, 0, write=False)
    assert g is not None and g.kind is GrantKind.NEW
    assert g.remove == RemoveMapping(2, ((b.moffset, SZ),))
    assert g.moffset == b.moffset
    assert alloc.lookup(2, 0) is None and alloc.lookup(1, 0) is not None
    assert a.moffset != c.moffset


def test_pinned_ranges_are_never_victims() -> None:
    alloc = DaxRangeAllocator(2 * SZ)
    g1 = alloc.get_range(1, 0, False, pin=True)
    g2 = alloc.get_range(2, 0, False, pin=True)
    assert g1 is not None and g2 is not None
    alloc.setup_done(g1, True)
    alloc.setup_done(g2, True)
    assert alloc.get_range(3, 0, False) is None  # nothing reclaimable: fall back to READ
    assert alloc.reclaim(5) == []
    with pytest.raises(LocalProtocolError):
        alloc.release_inode(1)
    alloc.unpin(g2)
    g = alloc.get_range(3, 0, False)
    assert g is not None and g.remove == RemoveMapping(2, ((g2.moffset, SZ),))
    with pytest.raises(LocalProtocolError):
        alloc.unpin(g)  # not a pinned grant


def test_release_inode_batches_removals() -> None:
    page = 1 << 12
    alloc = DaxRangeAllocator(600 * page, range_shift=12)
    for i in range(600):
        _ready(alloc, 9, i * page)
    _ready(alloc, 8, 0)  # the window is full: pushes out nodeid 9's oldest range
    assert alloc.lookup(9, 0) is None
    fifth = alloc.inode_ranges(9)[5][0]
    # Truncation-style release of the one range holding byte 5 * page.
    assert alloc.release_inode(9, foffset=5 * page + 1, length=1) == [
        RemoveMapping(9, ((fifth, page),))
    ]
    removals = alloc.release_inode(9)
    assert [r.count for r in removals] == [256, 256, 86]
    assert all(r.nodeid == 9 for r in removals)
    assert len({e for r in removals for e in r.entries}) == 598
    assert alloc.nr_free == 599 and alloc.inode_ranges(9) == {}
    assert alloc.release_inode(9) == []
    assert alloc.lookup(8, 0) is not None


def test_background_reclaim_frees_a_chunk_below_the_threshold() -> None:
    alloc = DaxRangeAllocator(50 * SZ)
    for i in range(40):
        _ready(alloc, 1 + i % 3, i * SZ)
    assert alloc.background_reclaim() == []  # 10 free of 50 = 20%: not below
    _ready(alloc, 1, 40 * SZ)
    removals = alloc.background_reclaim()
    assert sum(r.count for r in removals) == FUSE_DAX_RECLAIM_CHUNK
    assert alloc.nr_free == 19
    # The oldest ten, grouped per nodeid.
    assert sorted(off for r in removals for off, _ in r.entries) == [i * SZ for i in range(10)]


@pytest.mark.parametrize(
    "call",
    [
        lambda a: a.get_range(0, 0, False),
        lambda a: a.get_range(1 << 64, 0, False),
        lambda a: a.get_range(1, -1, False),
        lambda a: a.get_range(1, 1 << 63, False),
        lambda a: a.get_range("1", 0, False),
        lambda a: a.reclaim(-1),
        lambda a: DaxRangeAllocator(SZ - 1),
        lambda a: DaxRangeAllocator(SZ, range_shift=11),
        lambda a: DaxRangeAllocator(1 << 62, range_shift=12),
    ],
)
def test_caller_errors_are_local_protocol_errors(call: object) -> None:
    alloc = DaxRangeAllocator(4 * SZ)
    with pytest.raises(LocalProtocolError):
        call(alloc)  # type: ignore[operator]


# --------------------------------------------------------------------------- model-based


@dataclass
class _Entry:
    uid: int
    moffset: int
    writable: bool
    pending: bool
    upgrading: bool = False
    pins: int = 1  # the in-flight SETUPMAPPING


NR = 4  # ranges in the window; the working set below is 3 inodes x 6 ranges


class AllocatorMachine(RuleBasedStateMachine):
    """The allocator against a simple model and a simulated device window that only ever
    sees the requests the allocator asked to send."""

    @initialize()
    def setup(self) -> None:
        self.alloc = DaxRangeAllocator(NR * SZ + SZ // 2)  # the partial range is unused
        self.owned: dict[tuple[int, int], _Entry] = {}
        self.recency: list[tuple[int, int]] = []  # least recent first
        self.free = NR
        self.device: dict[int, tuple[int, int, bool]] = {}  # moffset -> (nodeid, foffset, w)
        self.outstanding: list[tuple[RangeGrant, int]] = []
        self.pins: list[tuple[RangeGrant, int]] = []
        self.next_uid = 0

    def _apply_removals(self, removals: list[RemoveMapping]) -> list[tuple[int, int]]:
        done = []
        for rm in removals:
            assert 1 <= rm.count <= REMOVEMAPPING_MAX_ENTRY
            for moffset, length in rm.entries:
                assert length == SZ
                assert self.device.pop(moffset)[0] == rm.nodeid, "removed another inode's range"
                done.append((rm.nodeid, moffset))
        return done

    def _reclaimable(self) -> list[tuple[int, int]]:
        return [k for k in self.recency if self.owned[k].pins == 0 and not self.owned[k].pending]

    def _drop(self, key: tuple[int, int]) -> None:
        del self.owned[key]
        self.recency.remove(key)
        self.free += 1

    @rule(
        nodeid=st.integers(1, 3),
        idx=st.integers(0, 5),
        write=st.booleans(),
        pin=st.booleans(),
        within=st.integers(0, SZ - 1),
    )
    def get(self, nodeid: int, idx: int, write: bool, pin: bool, within: int) -> None:
        key = (nodeid, idx)
        g = self.alloc.get_range(nodeid, idx * SZ + within, write, pin=pin)
        e = self.owned.get(key)
        if e is not None:
            assert g is not None and g.moffset == e.moffset
            if e.pending or (write and e.upgrading):
                assert g.kind is GrantKind.BUSY and g.setup is None and not g.pinned
                return
            self.recency.remove(key)
            self.recency.append(key)
            if write and not e.writable:
                assert g.kind is GrantKind.UPGRADE and g.setup is not None
                e.upgrading = True
                e.pins += 1
                self.outstanding.append((g, e.uid))
            else:
                assert g.kind is GrantKind.HIT and g.setup is None and g.remove is None
        else:
            victims = self._reclaimable()
            if self.free == 0 and not victims:
                assert g is None
                return
            assert g is not None and g.kind is GrantKind.NEW and g.setup is not None
            if self.free:
                assert g.remove is None
                assert g.moffset not in {x.moffset for x in self.owned.values()}, (
                    "double allocation"
                )
                self.free -= 1
            else:
                victim = victims[0]  # least recently used
                assert g.remove == RemoveMapping(victim[0], ((self.owned[victim].moffset, SZ),))
                assert g.moffset == self.owned[victim].moffset
                self._drop(victim)
                self.free -= 1
                self._apply_removals([g.remove])
            self.next_uid += 1
            e = _Entry(self.next_uid, g.moffset, write, pending=True)
            self.owned[key] = e
            self.recency.append(key)
            self.outstanding.append((g, e.uid))
        s = g.setup
        if s is not None:
            assert (s.nodeid, s.foffset, s.length, s.moffset, s.fh) == (
                nodeid,
                idx * SZ,
                SZ,
                g.moffset,
                FH_NONE,
            )
            assert s.writable == (write or e.writable)
        assert g.window_offset(idx * SZ + within) == g.moffset + within
        if pin:
            e.pins += 1
            self.pins.append((g, e.uid))

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), ok=st.booleans())
    def complete(self, data: st.DataObject, ok: bool) -> None:
        i = data.draw(st.integers(0, len(self.outstanding) - 1))
        g, uid = self.outstanding.pop(i)
        self.alloc.setup_done(g, ok)
        key = (g.nodeid, g.index)
        e = self.owned[key]
        assert e.uid == uid  # an outstanding setup pins its range: it cannot have moved
        e.pins -= 1
        if g.kind is GrantKind.NEW:
            if ok:
                e.pending = False
                assert g.moffset not in self.device
                self.device[g.moffset] = (g.nodeid, g.index * SZ, e.writable)
            else:
                self._drop(key)
        else:
            e.upgrading = False
            if ok:
                e.writable = True
                self.device[g.moffset] = (g.nodeid, g.index * SZ, True)  # exact replace

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.pins) - 1))
        g, uid = self.pins.pop(i)
        self.alloc.unpin(g)
        e = self.owned.get((g.nodeid, g.index))
        if e is not None and e.uid == uid:
            e.pins -= 1

    @rule(nodeid=st.integers(1, 3))
    def release(self, nodeid: int) -> None:
        keys = [k for k in self.recency if k[0] == nodeid]
        if any(self.owned[k].pins for k in keys):
            with pytest.raises(LocalProtocolError):
                self.alloc.release_inode(nodeid)
            return
        removals = self.alloc.release_inode(nodeid)
        assert all(r.nodeid == nodeid for r in removals)
        removed = self._apply_removals(removals)
        assert sorted(removed) == sorted((nodeid, self.owned[k].moffset) for k in keys)
        for k in keys:
            self._drop(k)

    @rule(count=st.integers(0, 5), background=st.booleans())
    def reclaim(self, count: int, background: bool) -> None:
        if background:
            count = reclaim_count(self.free, NR)
            removals = self.alloc.background_reclaim()
        else:
            removals = self.alloc.reclaim(count)
        victims = self._reclaimable()[:count]
        removed = self._apply_removals(removals)
        assert sorted(removed) == sorted((k[0], self.owned[k].moffset) for k in victims)
        # Within one nodeid the batch keeps LRU order.
        for nodeid in {k[0] for k in victims}:
            mine = [self.owned[k].moffset for k in victims if k[0] == nodeid]
            assert [m for n, m in removed if n == nodeid] == mine
        for k in victims:
            self._drop(k)

    @invariant()
    def consistent(self) -> None:
        a = self.alloc
        assert a.nr_ranges == NR
        assert a.nr_free == self.free and a.nr_busy == len(self.owned)
        assert a.nr_free + a.nr_busy == NR
        moffsets = [e.moffset for e in self.owned.values()]
        assert len(set(moffsets)) == len(moffsets), "a range is owned twice"
        assert all(0 <= m < NR * SZ and m % SZ == 0 for m in moffsets)
        assert a.lru_order() == self.recency
        ready = {k: e for k, e in self.owned.items() if not e.pending}
        for (nodeid, idx), e in self.owned.items():
            got = a.lookup(nodeid, idx * SZ + 7)
            assert got == (None if e.pending else (e.moffset + 7, e.writable))
        # The device, fed only with the requests the allocator returned, agrees.
        assert self.device == {e.moffset: (k[0], k[1] * SZ, e.writable) for k, e in ready.items()}


AllocatorMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_allocator_against_model = AllocatorMachine.TestCase


# --------------------------------------------------------------------------- real window


@pytest.fixture
def files(tmp_path: Path) -> Iterator[dict[int, int]]:
    """nodeid -> O_RDWR fd of an 8 MiB file of random bytes (4 ranges each)."""
    fds = {}
    try:
        for nodeid in (2, 3, 4):
            path = tmp_path / f"n{nodeid}"
            path.write_bytes(os.urandom(4 * SZ))
            fds[nodeid] = os.open(path, os.O_RDWR)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def _send(win: DaxWindow, fds: dict[int, int], alloc: DaxRangeAllocator, g: RangeGrant) -> None:
    """What the client + back-end + front-end do with a grant's requests."""
    if g.remove is not None:
        for moffset, length in g.remove.entries:
            win.unmap(moffset, length)
    if g.setup is not None:
        s = g.setup
        win.map(s.moffset, s.length, fds[s.nodeid], s.foffset, s.writable)
        alloc.setup_done(g, True)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_window_smaller_than_working_set_serves_correct_data(
    files: dict[int, int], seed: int
) -> None:
    """3 files x 4 ranges through a 3-range window: every read through the window equals
    pread, every write through it lands in the file, whatever reclaim did before."""
    rnd = random.Random(seed)
    alloc = DaxRangeAllocator(3 * SZ)
    reclaims = 0
    with DaxWindow(3 * SZ) as win:
        for _ in range(300):
            nodeid = rnd.choice(list(files))
            foffset = rnd.randrange(0, 4 * SZ - 4096)
            op = rnd.random()
            if op < 0.05:
                for rm in alloc.release_inode(nodeid):
                    for moffset, length in rm.entries:
                        win.unmap(moffset, length)
                continue
            if op < 0.1:
                for rm in alloc.reclaim(rnd.randint(1, 2)):
                    for moffset, length in rm.entries:
                        win.unmap(moffset, length)
                continue
            write = op < 0.4
            g = alloc.get_range(nodeid, foffset, write)
            assert g is not None and g.kind is not GrantKind.BUSY
            reclaims += g.remove is not None
            _send(win, files, alloc, g)
            n = min(4096, (g.index + 1) * SZ - foffset)  # stay inside the range
            at = g.window_offset(foffset)
            if write:
                data = rnd.randbytes(n)
                win.write(at, data)
                assert os.pread(files[nodeid], n, foffset) == data
            else:
                assert win.read(at, n) == os.pread(files[nodeid], n, foffset)
            # Bookkeeping of both sides agrees.
            assert {m.moffset for m in win.mappings()} == {
                mo for nid in files for mo, _ in alloc.inode_ranges(nid).values()
            }
        assert reclaims > 10
        # Eviction of everything leaves the window empty.
        for nodeid in files:
            for rm in alloc.release_inode(nodeid):
                for moffset, length in rm.entries:
                    win.unmap(moffset, length)
        assert win.mappings() == () and alloc.nr_free == 3
    gc.collect()
    inodes = {(os.fstat(fd).st_ino) for fd in files.values()}
    with open("/proc/self/maps") as maps:
        assert not [line for line in maps if int(line.split()[4]) in inodes]
