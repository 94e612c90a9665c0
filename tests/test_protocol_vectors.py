"""Golden vectors captured from the host kernel (tests/vectors/make_vectors.py): every request
and reply decodes and re-encodes byte for byte, and every reply passes the B5 validator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from virtiofs.cli import main
from virtiofs.protocol import (
    KERNEL_MINOR_VERSION,
    Opcode,
    decode_notify,
    decode_reply,
    decode_request,
    encode_error,
    encode_notify,
    encode_reply,
    encode_request,
    validate_reply,
)
from virtiofs.protocol.capturefile import Direction, decode_capture
from virtiofs.protocol.printer import format_capture

VECTORS = Path(__file__).resolve().parent / "vectors"
FILES = sorted(VECTORS.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    vector: dict[str, Any] = json.loads(path.read_text())
    return vector


def test_vectors_cover_at_least_35_opcodes() -> None:
    opcodes = {load(p)["opcode"] for p in FILES} - {None}
    assert len(opcodes) >= 35, sorted(opcodes)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_vector_round_trip(path: Path) -> None:
    v = load(path)
    if v["request"] is None:  # a notification the capture tool sent
        raw = bytes.fromhex(v["reply"])
        note = decode_notify(raw)
        assert encode_notify(note.code, note.arg, note.name, note.data, note.nodeids) == raw
        return
    raw = bytes.fromhex(v["request"])
    req = decode_request(raw, minor=v["minor"], flags=v["flags"])
    assert int(req.opcode) == v["opcode"] and req.header.len == len(raw)
    again = encode_request(req.opcode, req.unique, req.nodeid, req.arg, req.names,
                           bytes(req.data), req.items, uid=req.header.uid,
                           gid=req.header.gid, pid=req.header.pid, ext=req.ext,
                           minor=v["minor"], flags=v["flags"])
    assert again == raw
    if v["reply"] is None:
        assert req.spec.no_reply
        return
    reply_raw = bytes.fromhex(v["reply"])
    minor = v["minor"]
    if req.opcode is Opcode.INIT:
        minor = min(req.arg.minor, KERNEL_MINOR_VERSION)
    xattr = req.arg.size if req.opcode in (Opcode.GETXATTR, Opcode.LISTXATTR) else None
    reply = decode_reply(req.opcode, reply_raw, minor=minor, xattr_size=xattr)
    if reply.error:
        assert encode_error(reply.unique, reply.error) == reply_raw
    else:
        assert encode_reply(req.opcode, reply.unique, reply.value, minor) == reply_raw
    validate_reply(req, reply_raw, minor=v["minor"], flags=v["flags"])


def test_whole_capture_decodes_and_prints() -> None:
    blob = (VECTORS / "capture.fusecap").read_bytes()
    records = list(decode_capture(blob))
    requests = [r for r in records if r.direction is Direction.REQUEST]
    assert requests and decode_request(requests[0].data).opcode is Opcode.INIT
    lines = list(format_capture(blob))
    assert len(lines) == len(records)
    assert not [line for line in lines if line.startswith("!")]
    assert sum(line.startswith("<=") for line in lines) >= 1  # the retrieve notification


def test_decode_command_reads_captures_streams_and_vectors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = (VECTORS / "capture.fusecap").read_bytes()
    stream = b"".join(r.data for r in decode_capture(blob) if r.direction is Direction.REQUEST)
    (tmp_path / "requests.bin").write_bytes(stream)
    vector = next(p for p in FILES if "LOOKUP" in p.name)
    assert main(["decode", str(tmp_path / "requests.bin"), str(vector)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("== ") and out[1].startswith("-> INIT unique=")
    assert any(line.startswith("-> LOOKUP") and "names=" in line for line in out)
    assert not [line for line in out if line.startswith("!")]
    (tmp_path / "bad.bin").write_bytes(stream[:100])
    assert main(["decode", str(tmp_path / "bad.bin")]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("!  capture framing")
