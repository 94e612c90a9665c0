"""``virtiofs serve``: options (both styles, strictly parsed), capabilities, SIGTERM, sandboxes.

The sandboxes are checked from inside the confined process (a probe run through the same
``run_sandboxed`` the command uses tries to reach paths outside) and from outside the real
``virtiofs serve`` process (/proc/PID/root).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _vhost_user_frontend import OUT_HEADER, Frontend, fuse_request, init_request

from virtiofs.cli import main as cli_main
from virtiofs.commands.serve import CAPABILITIES, ConfigError, parse_o_options
from virtiofs.transport.vhost_user.sandbox import run_sandboxed

ROOT = Path(__file__).resolve().parents[1]


def serve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "virtiofs", "serve", *args]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(serve_argv(*args), capture_output=True, text=True, timeout=30,
                          cwd=ROOT)


@pytest.fixture
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes: keep them short.
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="vfs-serve-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- options ------------------------------------------------------------------------------------

def test_print_capabilities_is_the_vhost_user_json() -> None:
    r = run_cli("--print-capabilities")
    assert r.returncode == 0
    assert json.loads(r.stdout) == {"type": "fs", "features": ["separate-options"]}
    assert r.stdout == json.dumps(CAPABILITIES, indent=2) + "\n"


@pytest.mark.parametrize("args", [
    ("--socket-path", "/tmp/x.sock", "--bogus"),
    ("--socket-path", "/tmp/x.sock", "--cache", "sometimes", "--memory"),
    ("--socket-path", "/tmp/x.sock"),                                   # nothing to serve
    ("--shared-dir", "/tmp"),                                           # no socket
    ("--socket-path", "/tmp/x.sock", "-o", "source=/nonexistent-dir"),
    ("--socket-path", "/tmp/x.sock", "-o", "source=/tmp,source=/"),      # GHSA-rr59 style
    ("--socket-path", "/tmp/x.sock", "--shared-dir", "/tmp", "-o", "source=/"),
    ("--socket-path", "/tmp/x.sock", "-o", "source=/tmp,cache=auto", "-o", "cache=none"),
    ("--socket-path", "/tmp/x.sock", "-o", "source=/tmp,xattr,no_xattr"),
    ("--socket-path", "/tmp/x.sock", "-o", "source=/tmp,,xattr"),
    ("--socket-path", "/tmp/x.sock", "-o", "source=/tmp,rlimit_nofile=5"),
    ("--socket-path", "/tmp/x.sock", "-o", "source=/tmp,xattr=1"),
    ("--socket-path", "/tmp/x.sock", "--memory", "--thread-pool-size", "-1"),
    ("--socket-path", "/nonexistent-dir/x.sock", "--memory"),
])
def test_bad_options_are_one_line_and_exit_2(args: tuple[str, ...],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    try:
        status = cli_main(["serve", *args])
    except SystemExit as e:
        status = e.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("virtiofs serve: error:"), err
    assert out == ""


@pytest.mark.parametrize("args", [
    ("--socket-path", "/tmp/x.sock", "--bogus"),
    ("--socket-path", "/tmp/x.sock", "-o", "source=/tmp,source=/"),
])
def test_bad_options_from_the_real_command_line(args: tuple[str, ...]) -> None:
    r = run_cli(*args)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("virtiofs serve: error:"), r.stderr
    assert r.stdout == ""


def test_o_options_parse_item_by_item() -> None:
    assert parse_o_options(["source=/srv/a,cache=always,xattr", "writeback"]) == {
        "shared_dir": "/srv/a", "cache": "always", "xattr": True, "writeback": True}
    assert parse_o_options(["cache=never"]) == {"cache": "none"}
    # A value cannot carry another option: the comma always separates items, so a "source"
    # hidden in a value is a second source, refused.
    with pytest.raises(ConfigError):
        parse_o_options(["source=/srv/a,source=/"])
    with pytest.raises(ConfigError):
        parse_o_options(["source=/srv/a", "source=/"])
    with pytest.raises(ConfigError):
        parse_o_options(["source="])


# -- serving and stopping ---------------------------------------------------------------------

def start_serve(tmp: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    sock = tmp / "vhost.sock"
    proc = subprocess.Popen(serve_argv("--socket-path", str(sock), *args), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"serve did not start: {err.decode()[-2000:]}")
        time.sleep(0.02)
    return proc, sock


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    if proc.stderr:
        proc.stderr.close()


def served_child(proc: subprocess.Popen[bytes]) -> int:
    """The process that serves: the supervisor's child with a sandbox, else the process."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if kids:
            return int(kids[0])
        time.sleep(0.02)
    raise AssertionError("no served child")


def connect_and_serve_a_request(sock: Path) -> Frontend:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    fe = Frontend(s)
    fe.handshake()
    fe.setup_queue(0)
    fe.setup_queue(1)
    reply = fe.fuse(1, init_request(unique=1), 4096)
    assert OUT_HEADER.unpack_from(reply)[1:] == (0, 1)
    reply = fe.fuse(1, fuse_request(3, 2, b"\0" * 16), 256)  # GETATTR of the root
    assert OUT_HEADER.unpack_from(reply)[1:] == (0, 2)
    return fe


@pytest.mark.parametrize("sandbox", ["none", "chroot", "namespace"])
def test_sigterm_stops_cleanly_with_a_front_end_connected(tmp: Path, sandbox: str) -> None:
    shared = tmp / "shared"
    shared.mkdir()
    proc, sock = start_serve(tmp, "--shared-dir", str(shared), "--sandbox", sandbox)
    try:
        fe = connect_and_serve_a_request(sock)
        try:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            assert fe.chan.recv(timeout=5) is None  # the back-end hung up
        finally:
            fe.close()
        assert not sock.exists()
        assert not [p for p in tmp.iterdir() if p.name != "shared"]
        assert b"Traceback" not in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        stop(proc)


def test_serving_ends_when_the_front_end_goes_away(tmp: Path) -> None:
    proc, sock = start_serve(tmp, "--memory", "--sandbox", "none")
    try:
        fe = connect_and_serve_a_request(sock)
        fe.close()
        assert proc.wait(timeout=15) == 0
        assert not sock.exists()
    finally:
        stop(proc)


def test_reconnect_serves_the_next_front_end(tmp: Path) -> None:
    proc, sock = start_serve(tmp, "--memory", "--sandbox", "namespace", "--reconnect")
    try:
        for _ in range(2):
            connect_and_serve_a_request(sock).close()
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not sock.exists()
    finally:
        stop(proc)


# -- confinement ------------------------------------------------------------------------------

def _probe(report_fd: int, opened: list[int]) -> int:
    """Runs inside the sandbox: try to reach what lies outside, write what was reachable.

    ``opened`` holds the shared directory's fd as the filesystem would have opened it in
    ``prepare`` (before a chroot, after entering the namespaces).
    """
    found: dict[str, object] = {"root": sorted(os.listdir("/"))}
    for path in ("/etc/passwd", "/etc/hostname", "../../../etc/passwd", "/proc/1/root/etc/passwd"):
        try:
            with open(path, "rb"):
                found[path] = "OPEN"
        except OSError as e:
            found[path] = e.errno
    up = os.open("../../..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=opened[0])
    try:
        found["dotdot_from_shared"] = sorted(os.listdir(up))
    finally:
        os.close(up)
    os.write(report_fd, json.dumps(found).encode())
    return 0


def _open_root(path: str | None, opened: list[int]) -> None:
    assert path is not None
    opened.append(os.open(path, os.O_PATH | os.O_DIRECTORY))


@pytest.mark.parametrize("mode", ["chroot", "namespace"])
def test_sandbox_confines_the_serving_process(tmp: Path, mode: str) -> None:
    shared = tmp / "shared"
    shared.mkdir()
    (shared / "inside.txt").write_text("x")
    r, w = os.pipe()
    opened: list[int] = []
    try:
        status = run_sandboxed(mode, lambda: _probe(w, opened), root=shared,  # type: ignore[arg-type]
                               prepare=lambda path: _open_root(path, opened))
        os.close(w)
        w = -1
        report = json.loads(os.read(r, 65536))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert status == 0
    for path in ("/etc/passwd", "/etc/hostname", "../../../etc/passwd", "/proc/1/root/etc/passwd"):
        assert report[path] != "OPEN", (path, report)
    if mode == "chroot":
        assert report["root"] == ["inside.txt"]
        assert report["dotdot_from_shared"] == ["inside.txt"]  # .. stops at the root
    else:
        assert report["root"] == ["proc", "shared"]
        assert report["dotdot_from_shared"] == ["proc", "shared"]  # the empty tmpfs root
    assert sorted(os.listdir(shared)) == ["inside.txt"]  # nothing left in the share
    assert [p.name for p in tmp.iterdir()] == ["shared"]


@pytest.mark.parametrize("mode", ["chroot", "namespace"])
def test_serve_process_root_is_confined(tmp: Path, mode: str) -> None:
    shared = tmp / "shared"
    shared.mkdir()
    (shared / "inside.txt").write_text("x")
    proc, sock = start_serve(tmp, "--shared-dir", str(shared), "--sandbox", mode)
    try:
        child = served_child(proc)
        deadline = time.monotonic() + 10
        expected = ["inside.txt"] if mode == "chroot" else ["proc", "shared"]
        while sorted(os.listdir(f"/proc/{child}/root")) != expected:
            assert time.monotonic() < deadline, os.listdir(f"/proc/{child}/root")
            time.sleep(0.05)
        if mode == "namespace":
            # Alone in its PID namespace and without a network.
            status = Path(f"/proc/{child}/status").read_text()
            nspid = next(x for x in status.splitlines() if x.startswith("NSpid:"))
            assert nspid.split()[-1] == "1"
            assert os.readlink(f"/proc/{child}/ns/net") != os.readlink("/proc/self/ns/net")
            assert os.readlink(f"/proc/{child}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not sock.exists()
    finally:
        stop(proc)


@pytest.mark.parametrize("sandbox", ["none", "chroot", "namespace"])
def test_xattrs_and_truncate_work_in_every_sandbox(tmp: Path, sandbox: str) -> None:
    # The chroot sandbox has no /proc: PassthroughFS must reach O_PATH-held files through the
    # /proc/self/fd directory fd it opened before confinement (C virtiofsd's proc_self_fd).
    from virtiofs.client import Client
    from virtiofs.client.queue_channel import QueueChannel
    from virtiofs.transport.vhost_user.frontend import Frontend as RealFrontend

    shared = tmp / "shared"
    shared.mkdir()
    (shared / "f").write_bytes(b"0123456789")
    proc, sock = start_serve(tmp, "--shared-dir", str(shared), "--sandbox", sandbox, "--xattr")
    try:
        with RealFrontend.connect(sock) as fe:
            c = Client(QueueChannel.for_driver(fe), timeout=30)
            c.setxattr("/f", b"user.k", b"v")
            c.setxattr("/", b"user.d", b"w")
            assert c.getxattr("/f", b"user.k") == b"v"
            assert "user.k" in c.listxattr("/f")
            assert c.getxattr("/", b"user.d") == b"w"
            c.removexattr("/f", b"user.k")
            c.truncate("/f", 4)
            c.close()
        assert (shared / "f").read_bytes() == b"0123"
        assert os.listxattr(shared / "f") == []
        assert os.getxattr(shared, b"user.d") == b"w"
    finally:
        stop(proc)


def test_cache_size_serves_reads_through_the_dax_window(tmp: Path) -> None:
    # `virtiofs serve --cache-size` offers SHMEM_MAP; our front-end takes the window size from
    # GET_SHMEM_CONFIG (dax_window=-1) and the client reads without FUSE_READ after the mapping.
    from virtiofs.client import Client
    from virtiofs.client.queue_channel import QueueChannel
    from virtiofs.protocol import Opcode
    from virtiofs.transport.vhost_user.frontend import Frontend as RealFrontend

    shared = tmp / "shared"
    shared.mkdir()
    data = os.urandom(1 << 20)
    (shared / "f").write_bytes(data)
    proc, sock = start_serve(tmp, "--shared-dir", str(shared), "--sandbox", "none",
                             "--cache-size", "8M")
    try:
        with RealFrontend.connect(sock, dax_window=-1) as fe:
            c = Client(QueueChannel.for_driver(fe), cache="always", dax=True, timeout=30)
            with c.open("/f", "rb") as f:
                for _ in range(5):
                    f.seek(0)
                    assert f.read() == data
            assert c.stats[Opcode.SETUPMAPPING] == 1
            assert c.stats[Opcode.READ] == 0
            c.close()
    finally:
        stop(proc)


def test_cache_size_must_be_whole_dax_ranges() -> None:
    result = run_cli("--socket-path", "/tmp/x.sock", "--shared-dir", "/tmp", "--cache-size", "3M")
    assert result.returncode == 2
    assert "multiple of 2 MiB" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
