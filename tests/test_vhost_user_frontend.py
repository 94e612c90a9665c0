"""Our vhost-user front-end + client against real back-ends: QEMU's C virtiofsd and ours.

The same conformance suite must pass on both; ``virtiofs probe`` must exit 0 on both and say
what is wrong on a broken one.  C virtiofsd (Debian ``qemu-system-common``,
``/usr/lib/qemu/virtiofsd``) runs here as root with its default ``-o sandbox=namespace``: no
extra option is needed; it exits by itself when the front-end disconnects, and is killed by pid
otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtiofs.client import Client
from virtiofs.client.conformance import CHECKS, run_check
from virtiofs.client.queue_channel import QueueChannel
from virtiofs.errors import VhostUserError
from virtiofs.protocol import Opcode
from virtiofs.server.memfs import MemoryFS
from virtiofs.server.passthrough import PassthroughFS
from virtiofs.server.session import Session
from virtiofs.transport.vhost_user.backend import VhostUserBackend
from virtiofs.transport.vhost_user.frontend import Frontend

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
needs_virtiofsd = pytest.mark.skipif(not os.access(VIRTIOFSD, os.X_OK),
                                     reason="QEMU's C virtiofsd is not installed")

# QEMU 7.2 -> C virtiofsd bring-up (shared/docs/vhost-user-capture.txt lines 1-35, requests
# only), without the SET_VRING_CALL re-sends of lines 19-20.
QEMU_72_BRINGUP = [
    "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
    "GET_MAX_MEM_SLOTS", "SET_BACKEND_REQ_FD", "SET_OWNER", "GET_FEATURES",
    "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_CALL", "SET_VRING_ERR", "SET_FEATURES",
    "ADD_MEM_REG",
    "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
    "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
    "SET_VRING_ENABLE", "SET_VRING_ENABLE",
]


class CVirtiofsd:
    """QEMU's C virtiofsd on a temporary directory, killed by pid on exit."""

    def __init__(self, *options: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="virtiofs-cvfsd-"))
        self.src = self.dir / "src"
        self.src.mkdir()
        self.sock = self.dir / "vfsd.sock"
        self.log = open(self.dir / "log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [VIRTIOFSD, f"--socket-path={self.sock}", "-o", f"source={self.src}",
             "-o", "cache=auto", *options], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"virtiofsd did not start: {self.logtext()}")
            time.sleep(0.01)

    def logtext(self) -> str:
        return (self.dir / "log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class OurBackend:
    """Our VhostUserBackend serving PassthroughFS (or ``fs``) on a temporary socket."""

    def __init__(self, fs: Any = None, **options: Any) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="virtiofs-ours-"))
        self.src = self.dir / "src"
        self.src.mkdir()
        self.sock = self.dir / "be.sock"
        make = (lambda: Session(fs)) if fs is not None else \
            (lambda: Session(PassthroughFS(str(self.src))))
        self.backend = VhostUserBackend(make, self.sock, **options)
        self.backend.start()

    def stop(self) -> None:
        self.backend.close()
        shutil.rmtree(self.dir, ignore_errors=True)


PEERS = ["c-virtiofsd", "ours-split", "ours-packed"]


def _start(peer: str) -> tuple[Any, dict[str, Any]]:
    if peer == "c-virtiofsd":
        if not os.access(VIRTIOFSD, os.X_OK):
            pytest.skip("QEMU's C virtiofsd is not installed")
        return CVirtiofsd("-o", "xattr"), {}
    return OurBackend(), {"packed": peer == "ours-packed"}


@pytest.fixture(scope="module", params=PEERS)
def mounted(request: pytest.FixtureRequest) -> Iterator[tuple[str, Client, Frontend]]:
    peer, opts = _start(request.param)
    try:
        with Frontend.connect(peer.sock, **opts) as fe:
            client = Client(QueueChannel.for_driver(fe), cache="auto", timeout=30)
            yield request.param, client, fe
            client.close()
    finally:
        peer.stop()


@pytest.mark.parametrize("check", list(CHECKS))
def test_conformance(mounted: tuple[str, Client, Frontend], check: str) -> None:
    _, client, _ = mounted
    r = run_check(client, check)
    if r.status == "skip":
        pytest.skip(r.detail)
    assert r.status == "pass", f"{r.status}: {r.detail}"


@needs_virtiofsd
def test_bringup_matches_qemu_7_2_against_c_virtiofsd() -> None:
    peer = CVirtiofsd()
    try:
        fe = Frontend.connect(peer.sock)
        try:
            assert fe.log == QEMU_72_BRINGUP
            assert fe.offered_features == 0x1_7500_0000  # capture line 2
            assert fe.acked_features == 0x1_7000_0000  # what QEMU acked (line 21)
            assert fe.offered_protocol_features == fe.acked_protocol_features == 0x8C2B
            assert fe.backend_queue_num == 2 and fe.max_mem_slots == 32
            c = Client(QueueChannel.for_driver(fe), timeout=30)
            c.mkdir("/x")
            c.listdir("/")
            c.close()
            want = fe.expected_vring_bases()
            assert want[1] > 0
            assert fe.stop() == want  # every chain we made available was taken
            assert fe.log[-4:] == ["SET_VRING_ENABLE", "SET_VRING_ENABLE", "GET_VRING_BASE",
                                   "GET_VRING_BASE"]
        finally:
            fe.close()
    finally:
        peer.stop()


def test_tag_from_get_config_with_our_backend() -> None:
    peer = OurBackend(MemoryFS(), tag="myfs", reconnect=True)
    try:
        with Frontend.connect(peer.sock, tag="myfs") as fe:
            assert fe.config_tag == "myfs" and fe.config_num_request_queues == 1
        with pytest.raises(VhostUserError, match="tag"):
            Frontend.connect(peer.sock, tag="other")
    finally:
        peer.stop()


@needs_virtiofsd
def test_c_virtiofsd_has_no_config_for_a_tag() -> None:
    peer = CVirtiofsd()
    try:
        with pytest.raises(VhostUserError, match="CONFIG"):
            Frontend.connect(peer.sock, tag="myfs")
    finally:
        peer.stop()


def test_two_request_queues_with_our_backend() -> None:
    peer = OurBackend(MemoryFS(), num_request_queues=2)
    try:
        with Frontend.connect(peer.sock, num_request_queues=2) as fe:
            c = Client(QueueChannel.for_driver(fe), timeout=30)
            import threading
            done: list[int] = []

            def work(k: int) -> None:
                c.mkdir(f"/q{k}")
                for i in range(20):
                    with c.open(f"/q{k}/f{i}", "w") as f:
                        f.write(b"x" * i)
                done.append(k)
            ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            assert sorted(done) == [0, 1, 2, 3]
            c.close()
            assert len(fe.queues) == 3
    finally:
        peer.stop()


def _smoke(fe: Frontend) -> None:
    c = Client(QueueChannel.for_driver(fe), timeout=30)
    with c.open("/f", "w") as f:
        f.write(b"x" * 70_000)
    assert c.stat("/f").st_size == 70_000 and c.listdir("/") == ["f"]
    c.close()
    assert fe.stop() == fe.expected_vring_bases()


def test_without_configure_mem_slots_the_table_goes_in_set_mem_table() -> None:
    from virtiofs.transport.vhost_user.backend import DEFAULT_PROTOCOL_FEATURES
    from virtiofs.transport.vhost_user.messages import ProtocolFeature
    peer = OurBackend(MemoryFS(), protocol_features=DEFAULT_PROTOCOL_FEATURES
                      & ~(1 << ProtocolFeature.CONFIGURE_MEM_SLOTS))
    try:
        with Frontend.connect(peer.sock) as fe:
            assert "SET_MEM_TABLE" in fe.log and "ADD_MEM_REG" not in fe.log
            assert "GET_MAX_MEM_SLOTS" not in fe.log
            _smoke(fe)
    finally:
        peer.stop()


def test_without_protocol_features_rings_start_enabled() -> None:
    from virtiofs.transport.vhost_user.backend import DEFAULT_FEATURES
    from virtiofs.transport.vhost_user.messages import VirtioFeature
    peer = OurBackend(MemoryFS(), features=DEFAULT_FEATURES
                      & ~(1 << VirtioFeature.PROTOCOL_FEATURES))
    try:
        with Frontend.connect(peer.sock) as fe:
            assert fe.acked_protocol_features == 0
            for name in ("GET_PROTOCOL_FEATURES", "SET_VRING_ENABLE", "SET_BACKEND_REQ_FD"):
                assert name not in fe.log
            assert "SET_MEM_TABLE" in fe.log
            _smoke(fe)
    finally:
        peer.stop()


def test_without_event_idx_and_indirect() -> None:
    peer = OurBackend(MemoryFS())
    try:
        with Frontend.connect(peer.sock, event_idx=False, indirect=False, queue_size=8) as fe:
            assert fe.acked_features == 1 << 32 | 1 << 30  # VERSION_1 | PROTOCOL_FEATURES
            _smoke(fe)
    finally:
        peer.stop()


def test_frontend_gives_up_on_a_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Frontend.connect(tmp_path / "nothing", connect_timeout=0.1)


# ------------------------------------------------------------------------------ probe


def _probe(sock: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtiofs", "probe", "--socket-path",
                           str(sock), *extra], capture_output=True, text=True, timeout=300)


@needs_virtiofsd
def test_probe_passes_against_c_virtiofsd() -> None:
    peer = CVirtiofsd("-o", "xattr")
    try:
        r = _probe(peer.sock)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "0 failed" in r.stdout
        assert list(peer.src.iterdir()) == []  # the scratch directory is gone
    finally:
        peer.stop()


def test_probe_passes_against_our_backend() -> None:
    peer = OurBackend(tag="probe-me")
    try:
        r = _probe(peer.sock, "--tag", "probe-me", "--packed")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "config_tag" in r.stdout and "FAIL" not in r.stdout
    finally:
        peer.stop()


class _NoReplaceIgnored(MemoryFS):
    """A buggy server: RENAME_NOREPLACE replaces anyway."""

    def rename(self, ctx: Any, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        super().rename(ctx, parent, name, newparent, newname, 0)


def test_probe_names_what_is_wrong() -> None:
    peer = OurBackend(_NoReplaceIgnored())
    try:
        r = _probe(peer.sock, "--only", "rename_noreplace", "--only", "mkdir_rmdir_link_counts")
        assert r.returncode == 1
        line = next(x for x in r.stdout.splitlines() if "rename_noreplace" in x)
        assert "FAIL" in line and "expected EEXIST, but it succeeded" in line
        assert "mkdir_rmdir_link_counts" in r.stdout and "1 failed" in r.stdout
    finally:
        peer.stop()


def test_probe_list_and_bad_socket(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "virtiofs", "probe", "--socket-path", "x",
                        "--list"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "readdir_many_entries" in r.stdout
    r = _probe(tmp_path / "none", "--connect-timeout", "0.1")
    assert r.returncode == 1 and "cannot set up the device" in r.stdout


def test_destroy_reaches_the_backend() -> None:
    fs = MemoryFS()
    destroyed: list[int] = []
    fs.destroy = lambda: destroyed.append(1)  # type: ignore[method-assign]
    peer = OurBackend(fs)
    try:
        with Frontend.connect(peer.sock) as fe:
            c = Client(QueueChannel.for_driver(fe))
            c.close()
            assert c.stats[Opcode.DESTROY] == 1
            deadline = time.monotonic() + 5
            while not destroyed and time.monotonic() < deadline:
                time.sleep(0.01)
            assert destroyed == [1]
    finally:
        peer.stop()
