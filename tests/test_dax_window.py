"""DaxWindow against the real kernel: real files mapped into a real window, checked through
/proc/self/maps, os.pread and forked children that must fault (SPEC 1.8, 2.1, 3.5;
SECURITY B1 #13, B6 #13 and #18)."""

from __future__ import annotations

import errno
import faulthandler
import gc
import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from virtiofs.dax.window import PAGE_SIZE, U64_MAX, DaxWindow, OverlapPolicy
from virtiofs.errors import DaxMappingError, LocalProtocolError

MiB = 1 << 20
WINDOW = 16 * MiB
FILE_SIZE = 8 * MiB

# Inodes of every file a test here created: none of them may stay mapped after a test.
_TEST_INODES: set[tuple[int, int]] = set()


# --------------------------------------------------------------------------- helpers


def _vmas() -> list[tuple[int, int, str, int, str, int]]:
    """(start, end, perms, offset, dev "MM:mm", inode) of every VMA of this process."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi, fields[1], int(fields[2], 16), fields[3], int(fields[4])))
    return out


def _dev(st_dev: int) -> str:
    return f"{os.major(st_dev):02x}:{os.minor(st_dev):02x}"


def kernel_pages(win: DaxWindow) -> dict[int, tuple[str, int, int, bool]]:
    """Window page -> (dev, ino, file page, writable) as the kernel sees it.

    Also asserts what must hold of the rest of the window: every byte is covered by a VMA
    (never a hole), and every non-file VMA is the inaccessible private placeholder.
    """
    base, end = win.address, win.address + win.size
    pages: dict[int, tuple[str, int, int, bool]] = {}
    covered = 0
    for lo, hi, perms, offset, dev, ino in _vmas():
        lo_c, hi_c = max(lo, base), min(hi, end)
        if lo_c >= hi_c:
            continue
        covered += hi_c - lo_c
        if ino == 0:
            assert perms == "---p", f"window VMA {lo:#x}-{hi:#x} is {perms}, not the placeholder"
            continue
        assert perms in ("r--s", "rw-s"), perms
        for addr in range(lo_c, hi_c, PAGE_SIZE):
            fpage = (offset + addr - lo) // PAGE_SIZE
            pages[(addr - base) // PAGE_SIZE] = (dev, ino, fpage, perms == "rw-s")
    assert covered == win.size, "part of the window is not mapped at all (a hole)"
    return pages


def booked_pages(win: DaxWindow) -> dict[int, tuple[str, int, int, bool]]:
    """The same expansion from the window's own bookkeeping."""
    pages = {}
    for m in win.mappings():
        for i in range(m.length // PAGE_SIZE):
            pages[m.moffset // PAGE_SIZE + i] = (
                _dev(m.dev),
                m.ino,
                m.foffset // PAGE_SIZE + i,
                m.writable,
            )
    return pages


def assert_consistent(win: DaxWindow) -> None:
    assert kernel_pages(win) == booked_pages(win)


def mapped_test_files() -> list[tuple[int, int, str, int, str, int]]:
    return [v for v in _vmas() if v[5] and (v[4], v[5]) in {(_dev(d), i) for d, i in _TEST_INODES}]


def run_in_child(action: Callable[[], object], timeout: float = 10.0) -> int:
    """Run ``action`` in a forked child; return its exit code (-signal if killed by one).

    The child never returns into pytest: it leaves with os._exit whatever happens.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 3
        try:
            faulthandler.disable()
            signal.signal(signal.SIGSEGV, signal.SIG_DFL)
            signal.signal(signal.SIGBUS, signal.SIG_DFL)
            action()
            code = 0
        finally:
            os._exit(code)
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
    assert ready, "child did not finish in time"
    return os.waitstatus_to_exitcode(status)


def _make_file(path: Path, size: int, flags: int = os.O_RDWR) -> tuple[int, bytes]:
    data = os.urandom(size)
    path.write_bytes(data)
    fd = os.open(path, flags)
    st_ = os.fstat(fd)
    _TEST_INODES.add((st_.st_dev, st_.st_ino))
    return fd, data


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _nothing_left_mapped() -> Iterator[None]:
    yield
    gc.collect()  # windows dropped without close() go through their finalizer
    assert mapped_test_files() == []


@pytest.fixture
def window() -> Iterator[DaxWindow]:
    win = DaxWindow(WINDOW)
    try:
        yield win
    finally:
        win.close()


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    fd, data = _make_file(tmp_path / "data", FILE_SIZE)
    try:
        yield fd, data
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- basic behaviour


def test_placeholder_is_inaccessible_and_reserved(window: DaxWindow) -> None:
    assert kernel_pages(window) == {}
    assert window.address % PAGE_SIZE == 0
    code = run_in_child(lambda: window.view.__getitem__(0))
    assert code == -signal.SIGSEGV


def test_read_through_window_equals_file(window: DaxWindow, data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    window.map(0, 2 * MiB, fd, 4 * MiB)
    window.map(6 * MiB, 2 * MiB, fd, 0)
    assert_consistent(window)
    with window.view as v:
        assert v[0 : 2 * MiB] == data[4 * MiB : 6 * MiB]
        assert v[6 * MiB : 8 * MiB] == data[0 : 2 * MiB]
    assert window.read(6 * MiB + 123, 4000) == os.pread(fd, 4000, 123)
    buf = bytearray(PAGE_SIZE)
    assert window.readinto(PAGE_SIZE, buf) == PAGE_SIZE
    assert buf == os.pread(fd, PAGE_SIZE, 4 * MiB + PAGE_SIZE)


def test_write_through_window_lands_in_host_file(
    window: DaxWindow, data_file: tuple[int, bytes]
) -> None:
    fd, _ = data_file
    window.map(2 * MiB, 2 * MiB, fd, 2 * MiB, writable=True)
    with window.view as v:
        v[2 * MiB + 10 : 2 * MiB + 15] = b"hello"
    # MAP_SHARED: the page-cache page is the file's, visible to pread at once.
    assert os.pread(fd, 5, 2 * MiB + 10) == b"hello"
    window.write(4 * MiB - 3, b"end")
    window.sync(2 * MiB, 2 * MiB)
    assert os.pread(fd, 3, 4 * MiB - 3) == b"end"
    # And the other way: a pwrite is seen through the window.
    os.pwrite(fd, b"from host", 3 * MiB)
    assert window.read(3 * MiB, 9) == b"from host"


def test_readonly_mapping_is_enforced_by_the_kernel(
    window: DaxWindow, data_file: tuple[int, bytes]
) -> None:
    fd, _ = data_file
    window.map(0, 2 * MiB, fd, 0, writable=False)
    with pytest.raises(LocalProtocolError):
        window.write(0, b"x")

    def store() -> None:
        with window.view as v:
            v[0] = 1

    assert run_in_child(store) == -signal.SIGSEGV
    assert run_in_child(lambda: window.view.__getitem__(0)) == 0


def test_unmap_makes_the_range_inaccessible(
    window: DaxWindow, data_file: tuple[int, bytes]
) -> None:
    fd, _ = data_file
    window.map(0, 2 * MiB, fd, 0)
    window.map(2 * MiB, 2 * MiB, fd, 2 * MiB)
    assert run_in_child(lambda: window.view.__getitem__(2 * MiB + 5)) == 0
    removed = window.unmap(2 * MiB, 2 * MiB)
    assert [(m.moffset, m.length, m.foffset) for m in removed] == [(2 * MiB, 2 * MiB, 2 * MiB)]
    assert_consistent(window)
    assert run_in_child(lambda: window.view.__getitem__(2 * MiB + 5)) == -signal.SIGSEGV
    assert run_in_child(lambda: window.view.__getitem__(5)) == 0
    with pytest.raises(LocalProtocolError):
        window.read(2 * MiB, 1)


def test_exact_overlap_replaces_for_the_write_upgrade(
    window: DaxWindow, data_file: tuple[int, bytes]
) -> None:
    # Linux upgrades a read-only range by re-sending SETUPMAPPING with WRITE (fs/fuse/dax.c).
    fd, _ = data_file
    window.map(4 * MiB, 2 * MiB, fd, 0, writable=False)
    window.map(4 * MiB, 2 * MiB, fd, 0, writable=True)
    assert [m.writable for m in window.mappings()] == [True]
    assert_consistent(window)
    window.write(4 * MiB, b"up")
    assert os.pread(fd, 2, 0) == b"up"


def test_unmap_whole_window_with_u64_max(window: DaxWindow, data_file: tuple[int, bytes]) -> None:
    fd, _ = data_file
    for i in range(4):
        window.map(i * 4 * MiB, MiB, fd, i * MiB, writable=bool(i % 2))
    # cloud-hypervisor fs_slave_unmap: len u64::MAX means the whole window, offset ignored.
    assert len(window.unmap(U64_MAX, U64_MAX)) == 4
    assert window.mappings() == () and kernel_pages(window) == {}
    assert window.unmap(0, U64_MAX) == []


def test_map_after_closing_the_fd_keeps_the_file(tmp_path: Path, window: DaxWindow) -> None:
    fd, data = _make_file(tmp_path / "f", 2 * MiB)
    window.map(0, 2 * MiB, fd, 0)
    os.close(fd)
    assert window.read(0, 64) == data[:64]


def test_kernel_refusal_leaves_placeholder_not_a_hole(
    window: DaxWindow, data_file: tuple[int, bytes]
) -> None:
    # procfs files are regular but cannot be mmapped: the kernel says ENODEV after our checks.
    fd, _ = data_file
    window.map(0, 2 * MiB, fd, 0)
    proc = os.open("/proc/self/stat", os.O_RDONLY)
    try:
        with pytest.raises(DaxMappingError) as exc:
            window.map(2 * MiB, PAGE_SIZE, proc, 0)
        assert exc.value.errno == errno.ENODEV
        assert_consistent(window)  # also asserts no hole anywhere in the window
        # Replacing an existing mapping and failing leaves that range unmapped (documented).
        with pytest.raises(DaxMappingError):
            window.map(0, 2 * MiB, proc, 0)
        assert window.mappings() == ()
        assert_consistent(window)
    finally:
        os.close(proc)


# --------------------------------------------------------------------------- hostile arguments

P = PAGE_SIZE
HOSTILE_MAPS = [
    # (moffset, len, foffset, errno)
    pytest.param(WINDOW, P, 0, errno.EINVAL, id="moffset-at-end"),
    pytest.param(WINDOW - P, 2 * P, 0, errno.EINVAL, id="len-past-end"),
    pytest.param(0, WINDOW + P, 0, errno.EINVAL, id="len-bigger-than-window"),
    pytest.param(U64_MAX - P + 1, 2 * P, 0, errno.EINVAL, id="moffset+len-overflows-u64"),
    pytest.param(P, U64_MAX, 0, errno.EINVAL, id="len-u64-max"),
    pytest.param(U64_MAX, P, 0, errno.EINVAL, id="moffset-u64-max"),
    pytest.param(1 << 64, P, 0, errno.EINVAL, id="moffset-past-u64"),
    pytest.param(-P, P, 0, errno.EINVAL, id="negative-moffset"),
    pytest.param(0, -P, 0, errno.EINVAL, id="negative-len"),
    pytest.param(0, 0, 0, errno.EINVAL, id="len-zero"),
    pytest.param(1, P, 0, errno.EINVAL, id="unaligned-moffset"),
    pytest.param(0, P + 1, 0, errno.EINVAL, id="unaligned-len"),
    pytest.param(0, P, 1, errno.EINVAL, id="unaligned-foffset"),
    pytest.param(0, P, -P, errno.EINVAL, id="negative-foffset"),
    pytest.param(0, 2 * P, (1 << 63) - P, errno.EINVAL, id="foffset+len-overflows-off_t"),
    pytest.param(0, P, U64_MAX - P + 1, errno.EINVAL, id="foffset-huge"),
    pytest.param(0.0, P, 0, errno.EINVAL, id="float-moffset"),
    pytest.param(MiB, 2 * MiB, 0, errno.EINVAL, id="partial-overlap-start"),
    pytest.param(3 * MiB, 2 * MiB, 0, errno.EINVAL, id="partial-overlap-end"),
    pytest.param(2 * MiB, P, 0, errno.EINVAL, id="inside-existing"),
    pytest.param(0, 8 * MiB, 0, errno.EINVAL, id="covers-existing"),
]


@pytest.mark.parametrize("moffset,length,foffset,err", HOSTILE_MAPS)
def test_hostile_map_is_rejected_with_nothing_mapped(
    window: DaxWindow,
    data_file: tuple[int, bytes],
    moffset: int,
    length: int,
    foffset: int,
    err: int,
) -> None:
    fd, _ = data_file
    window.map(2 * MiB, 2 * MiB, fd, 0)
    before_maps, before_pages = window.mappings(), kernel_pages(window)
    with pytest.raises(DaxMappingError) as exc:
        window.map(moffset, length, fd, foffset, writable=True)
    assert exc.value.errno == err
    assert window.mappings() == before_maps
    assert kernel_pages(window) == before_pages


def _bad_fds(tmp_path: Path) -> Iterator[tuple[str, int, bool, int]]:
    """(name, fd, writable, errno) for descriptors that must not be mapped."""
    fd, _ = _make_file(tmp_path / "ro", P, os.O_RDONLY)
    yield "read-only fd, writable mapping", fd, True, errno.EACCES
    fd, _ = _make_file(tmp_path / "wo", P, os.O_WRONLY)
    yield "write-only fd", fd, False, errno.EACCES
    fd, _ = _make_file(tmp_path / "ap", P, os.O_RDWR | os.O_APPEND)
    yield "O_APPEND fd, writable mapping", fd, True, errno.EACCES
    fd = os.open(tmp_path / "ro", os.O_PATH)
    yield "O_PATH fd", fd, False, errno.EBADF
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield "directory", fd, False, errno.EBADF
    r, w = os.pipe()
    os.close(w)
    yield "pipe", r, False, errno.EBADF
    fd = os.open("/dev/zero", os.O_RDWR)
    yield "character device", fd, True, errno.EBADF


def test_unmappable_fds_are_rejected(window: DaxWindow, tmp_path: Path) -> None:
    for name, fd, writable, err in _bad_fds(tmp_path):
        try:
            with pytest.raises(DaxMappingError) as exc:
                window.map(0, P, fd, 0, writable=writable)
            assert exc.value.errno == err, name
        finally:
            os.close(fd)
    closed = os.open(tmp_path / "ro", os.O_RDONLY)
    os.close(closed)
    bad: list[object] = [-1, closed, 1 << 40, None]
    for bad_fd in bad:
        with pytest.raises(DaxMappingError) as exc:
            window.map(0, P, bad_fd, 0)  # type: ignore[arg-type]
        assert exc.value.errno == errno.EBADF
    assert window.mappings() == () and kernel_pages(window) == {}


HOSTILE_UNMAPS = [
    pytest.param(0, 0, id="len-zero"),
    pytest.param(WINDOW, P, id="out-of-window"),
    pytest.param(U64_MAX - P + 1, 2 * P, id="overflow"),
    pytest.param(P + 1, P, id="unaligned-moffset"),
    pytest.param(2 * MiB, P + 3, id="unaligned-len"),
    pytest.param(2 * MiB, P, id="part-of-a-mapping"),
    pytest.param(0, 8 * MiB, id="more-than-a-mapping"),
    pytest.param(8 * MiB, 2 * MiB, id="nothing-mapped-there"),
    pytest.param(U64_MAX - 1, U64_MAX - 1, id="len-u64-max-minus-one"),
]


@pytest.mark.parametrize("moffset,length", HOSTILE_UNMAPS)
def test_hostile_unmap_is_rejected(
    window: DaxWindow, data_file: tuple[int, bytes], moffset: int, length: int
) -> None:
    fd, _ = data_file
    window.map(2 * MiB, 2 * MiB, fd, 0)
    before = kernel_pages(window)
    with pytest.raises(DaxMappingError) as exc:
        window.unmap(moffset, length)
    assert exc.value.errno == errno.EINVAL
    assert kernel_pages(window) == before and len(window.mappings()) == 1


def test_configurable_alignment(data_file: tuple[int, bytes]) -> None:
    fd, _ = data_file
    with DaxWindow(4 * MiB, alignment=64 * 1024) as win:
        for moffset, foffset in ((P, 0), (0, P)):
            with pytest.raises(DaxMappingError) as exc:
                win.map(moffset, 64 * 1024, fd, foffset)
            assert exc.value.errno == errno.EINVAL
        win.map(64 * 1024, P, fd, 128 * 1024)  # lengths need page alignment only
        assert_consistent(win)


def test_running_out_of_mappings_is_enomem(data_file: tuple[int, bytes]) -> None:
    fd, _ = data_file
    with DaxWindow(MiB, max_mappings=3) as win:
        for i in range(3):
            win.map(i * 2 * P, P, fd, 0)
        with pytest.raises(DaxMappingError) as exc:
            win.map(8 * P, P, fd, 0)
        assert exc.value.errno == errno.ENOMEM
        win.map(0, P, fd, P)  # exact replacement does not need a new slot
        win.unmap(2 * P, P)
        win.map(8 * P, P, fd, 0)
        assert_consistent(win)


def test_split_policy_trims_and_splits(data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    with DaxWindow(WINDOW, overlap=OverlapPolicy.SPLIT) as win:
        win.map(0, 8 * P, fd, 0)
        win.map(2 * P, 2 * P, fd, 100 * P, writable=True)  # splits [0, 8) into three
        assert [(m.moffset // P, m.length // P, m.foffset // P) for m in win.mappings()] == [
            (0, 2, 0),
            (2, 2, 100),
            (4, 4, 4),
        ]
        assert_consistent(win)
        assert win.read(4 * P, P) == data[4 * P : 5 * P]
        win.unmap(P, 4 * P)  # trims both neighbours, removes the middle
        assert [(m.moffset // P, m.length // P, m.foffset // P) for m in win.mappings()] == [
            (0, 1, 0),
            (5, 3, 5),
        ]
        assert_consistent(win)
        assert win.unmap(10 * P, P) == []  # nothing there: not an error here
        assert run_in_child(lambda: win.view.__getitem__(2 * P)) == -signal.SIGSEGV


def test_checked_access_refuses_unmapped_and_out_of_window(
    window: DaxWindow, data_file: tuple[int, bytes]
) -> None:
    fd, _ = data_file
    window.map(0, 2 * P, fd, 0)
    for moffset, length in ((P, 2 * P), (WINDOW - 1, 2), (-1, 1), (0, -1), (WINDOW, 1)):
        with pytest.raises(LocalProtocolError):
            window.read(moffset, length)
    window.map(2 * P, P, fd, 10 * P)  # adjacent mappings: an access may span them
    assert window.read(P, 2 * P) == os.pread(fd, P, P) + os.pread(fd, P, 10 * P)


def test_concurrent_map_unmap_keeps_bookkeeping_consistent(
    window: DaxWindow, data_file: tuple[int, bytes]
) -> None:
    # The back-end channel maps and unmaps while the client reads: one lock orders them.
    fd, data = data_file
    errors: list[BaseException] = []

    def worker(slot: int) -> None:
        try:
            for i in range(150):
                moffset, foffset = slot * 2 * MiB, (i % 4) * MiB
                window.map(moffset, MiB, fd, foffset)
                assert window.read(moffset, 32) == data[foffset : foffset + 32]
                window.unmap(moffset, MiB)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert window.mappings() == () and kernel_pages(window) == {}


# --------------------------------------------------------------------------- teardown


def test_close_unmaps_everything_even_with_a_view_alive(data_file: tuple[int, bytes]) -> None:
    fd, _ = data_file
    win = DaxWindow(WINDOW)
    base = win.address
    win.map(0, 2 * MiB, fd, 0)
    view = win.view
    win.close()
    win.close()  # idempotent
    assert mapped_test_files() == []
    # The range stays reserved (inaccessible) while the view lives: a stale access faults
    # instead of reading whatever the address is reused for.
    assert any(lo <= base < hi and perms == "---p" for lo, hi, perms, *_ in _vmas())
    assert run_in_child(lambda: view.__getitem__(0)) == -signal.SIGSEGV
    view.release()
    assert not any(lo <= base < hi for lo, hi, *_ in _vmas())
    with pytest.raises(LocalProtocolError):
        win.map(0, P, fd, 0)
    with pytest.raises(LocalProtocolError):
        win.view  # noqa: B018


def test_finalizer_unmaps_a_dropped_window(data_file: tuple[int, bytes]) -> None:
    fd, _ = data_file
    win = DaxWindow(WINDOW)
    base = win.address
    win.map(0, 2 * MiB, fd, 0)
    del win
    gc.collect()
    assert mapped_test_files() == []
    assert not any(
        lo <= base < hi and ino == 0 and perms == "---p" and hi - lo >= WINDOW
        for lo, hi, perms, _o, _d, ino in _vmas()
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0},
        {"size": P + 1},
        {"size": -P},
        {"size": 1 << 60},
        {"size": MiB, "alignment": 3 * P},
        {"size": MiB, "alignment": P // 2},
        {"size": P, "alignment": 2 * P},
        {"size": MiB, "max_mappings": 0},
        {"size": MiB, "overlap": "split"},
    ],
)
def test_constructor_refuses_bad_configuration(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        DaxWindow(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- property

PROP_PAGES = 64  # window size in pages for the property test
PROP_FILE_PAGES = 48


@pytest.fixture(scope="module")
def prop_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[int, bytes]]]:
    d = tmp_path_factory.mktemp("dax_prop")
    files = [_make_file(d / f"f{i}", PROP_FILE_PAGES * P) for i in range(2)]
    try:
        yield files
    finally:
        for fd, _ in files:
            os.close(fd)


_aligned = st.integers(0, PROP_PAGES - 1).map(lambda n: n * P)
_hostile_offset = st.one_of(
    st.integers(-2, PROP_PAGES + 2).map(lambda n: n * P),
    st.integers(0, PROP_PAGES * P),  # mostly unaligned
    st.sampled_from([U64_MAX, U64_MAX - P + 1, 1 << 63, 1 << 64]),
)


def _mostly(
    valid: st.SearchStrategy[int], hostile: st.SearchStrategy[int]
) -> st.SearchStrategy[int]:
    """Valid values four times out of five, so that sequences build up real layouts."""
    return st.integers(0, 4).flatmap(lambda k: hostile if k == 0 else valid)


_offset = _mostly(_aligned, _hostile_offset)
_small_len = st.integers(1, 12).map(lambda n: n * P)
_hostile_len = st.one_of(
    st.integers(0, 3 * P),
    st.sampled_from([0, U64_MAX, PROP_PAGES * P, (PROP_PAGES + 1) * P]),
)
_len = _mostly(_small_len, _hostile_len)
_map_op = st.tuples(st.just("map"), _offset, _len, st.integers(0, 1), _offset, st.booleans())
_unmap_op = st.tuples(st.just("unmap"), _offset, _len)
_op = st.integers(0, 2).flatmap(lambda k: _unmap_op if k == 0 else _map_op)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(OverlapPolicy), ops=st.lists(_op, min_size=1, max_size=30))
def test_any_op_sequence_keeps_bookkeeping_equal_to_the_kernel(
    prop_files: list[tuple[int, bytes]], policy: OverlapPolicy, ops: list[tuple[object, ...]]
) -> None:
    size = PROP_PAGES * P
    # Independent page-level model: window page -> (file index, file page, writable), and for
    # EXACT the set of whole mappings as (first page, pages).
    model: dict[int, tuple[int, int, bool]] = {}
    extents: set[tuple[int, int]] = set()
    inode_of = {}
    for i, (fd, _) in enumerate(prop_files):
        s = os.fstat(fd)
        inode_of[(_dev(s.st_dev), s.st_ino)] = i

    def valid_range(moffset: int, length: int) -> bool:
        return (
            0 <= moffset
            and moffset % P == 0
            and 0 < length
            and length % P == 0
            and moffset + length <= size
        )

    accepted = 0
    with DaxWindow(size, overlap=policy) as win:
        for op in ops:
            if op[0] == "map":
                _, moffset, length, fi, foffset, writable = op
                assert isinstance(moffset, int) and isinstance(length, int)
                assert (
                    isinstance(fi, int) and isinstance(foffset, int) and isinstance(writable, bool)
                )
                first, n = moffset // P, length // P
                ok = (
                    valid_range(moffset, length)
                    and 0 <= foffset < (1 << 63) - length
                    and foffset % P == 0
                )
                hit = {p for p in range(first, first + n) if p in model} if ok else set()
                if ok and policy is OverlapPolicy.EXACT and hit:
                    ok = (first, n) in extents
                try:
                    win.map(moffset, length, prop_files[fi][0], foffset, writable)
                except DaxMappingError as exc:
                    assert not ok, f"{op} refused: {exc}"
                    assert exc.errno == errno.EINVAL
                    event("map refused")
                else:
                    assert ok, f"{op} accepted"
                    event("map accepted" + (" (replacing)" if hit else ""))
                    accepted += 1
                    for k in range(n):
                        model[first + k] = (fi, foffset // P + k, writable)
                    if policy is OverlapPolicy.EXACT:
                        extents.add((first, n))  # a set: an exact replacement stays one extent
            else:
                _, moffset, length = op
                assert isinstance(moffset, int) and isinstance(length, int)
                first, n = moffset // P, length // P
                if length == U64_MAX:
                    ok = True
                    first, n = 0, PROP_PAGES
                elif policy is OverlapPolicy.EXACT:
                    ok = valid_range(moffset, length) and (first, n) in extents
                else:
                    ok = valid_range(moffset, length)
                try:
                    win.unmap(moffset, length)
                except DaxMappingError as exc:
                    assert not ok, f"{op} refused: {exc}"
                    assert exc.errno == errno.EINVAL
                    event("unmap refused")
                else:
                    assert ok, f"{op} accepted"
                    event("unmap accepted")
                    for k in range(first, first + n):
                        model.pop(k, None)
                    if length == U64_MAX:
                        extents.clear()
                    else:
                        extents.discard((first, n))
            if policy is OverlapPolicy.EXACT:
                assert extents == {(m.moffset // P, m.length // P) for m in win.mappings()}
            kernel = kernel_pages(win)
            assert kernel == booked_pages(win)
            assert {p: (inode_of[(d, i)], fp, w) for p, (d, i, fp, w) in kernel.items()} == model
            # Content: every mapped page inside its file reads the file's bytes.
            for p, (fi, fp, _w) in model.items():
                if fp < PROP_FILE_PAGES:
                    assert win.read(p * P, 16) == prop_files[fi][1][fp * P : fp * P + 16]
    event(f"maps accepted per example: {min(accepted, 5)}{'+' if accepted >= 5 else ''}")
