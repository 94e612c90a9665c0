"""``virtiofs capture`` against the host kernel: what it records is what the kernel sent, and
every reply it wrote passes the validator (the kernel accepted them: the syscalls succeeded)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from virtiofs.protocol import Opcode, decode_request, validate_reply
from virtiofs.protocol.capturefile import Direction, decode_capture

pytestmark = [
    pytest.mark.devfuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse"),
]
REPO = Path(__file__).resolve().parent.parent


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def test_capture_records_a_real_kernel_session(tmp_path: Path) -> None:
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "virtiofs", "capture", mnt, "--out",
                             str(out)], cwd=REPO, stderr=subprocess.PIPE)
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        deadline = time.monotonic() + 15
        while not _mounted(mnt):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "mount did not appear"
            time.sleep(0.05)
        with open(os.path.join(mnt, "hello"), "wb") as f:
            f.write(b"hello kernel")
        with open(os.path.join(mnt, "hello"), "rb") as f:
            assert f.read() == b"hello kernel"
        os.mkdir(os.path.join(mnt, "dir"))
        assert sorted(os.listdir(mnt)) == ["dir", "hello"]
        os.rename(os.path.join(mnt, "hello"), os.path.join(mnt, "dir", "moved"))
        assert os.stat(os.path.join(mnt, "dir", "moved")).st_size == 12
    finally:
        libc.umount2(mnt.encode(), 2)  # MNT_DETACH
        try:
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
            if proc.stderr:
                proc.stderr.close()
    assert not _mounted(mnt)

    records = list(decode_capture((out / "capture.fusecap").read_bytes()))
    minor, flags = 45, 0
    pending = {}
    seen = set()
    for record in records:
        if record.direction is Direction.REQUEST:
            req = decode_request(record.data, minor=minor, flags=flags)
            seen.add(req.opcode)
            pending[req.unique] = req
        elif record.direction is Direction.REPLY:
            req = pending.pop(int.from_bytes(record.data[8:16], "little"))
            reply = validate_reply(req, record.data, minor=minor, flags=flags)
            if req.opcode is Opcode.INIT:
                out_ = reply.value
                minor = min(req.arg.minor, out_.minor)
                flags = out_.flags | (out_.flags2 << 32)
    assert {Opcode.INIT, Opcode.LOOKUP, Opcode.CREATE, Opcode.WRITE, Opcode.READ,
            Opcode.MKDIR, Opcode.RENAME, Opcode.READDIRPLUS} <= seen
