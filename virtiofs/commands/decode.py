"""``virtiofs decode FILE``: print a capture of FUSE messages, one line per message.

Reads what ``virtiofs capture`` writes (``capture.fusecap``), a raw stream of concatenated
requests (each framed by ``in_header.len``), or a golden-vector JSON file from
``tests/vectors``.  Each line names the opcode, the unique, the node and the decoded fields,
all from the ``OPCODES`` table (``virtiofs.protocol.printer``); ``->`` is a request, ``<-`` a
reply, ``<=`` a notification, ``!`` something that does not decode (printed, not fatal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..protocol.capturefile import Direction, Record
from ..protocol.printer import CaptureDecoder, format_capture

HELP = "Print a capture of FUSE messages readably"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``virtiofs decode``."""
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="capture.fusecap, a raw request stream, or a vector .json")


def _vector_lines(path: Path) -> list[str]:
    vector = json.loads(path.read_text())
    decoder = CaptureDecoder()
    decoder.minor, decoder.flags = vector.get("minor", 45), vector.get("flags", 0)
    lines = []
    if vector.get("request"):
        lines.append(decoder.feed(Record(Direction.REQUEST, bytes.fromhex(vector["request"]))))
        if vector.get("reply"):
            lines.append(decoder.feed(Record(Direction.REPLY, bytes.fromhex(vector["reply"]))))
    elif vector.get("reply"):
        lines.append(decoder.feed(Record(Direction.NOTIFY, bytes.fromhex(vector["reply"]))))
    return lines


def run(args: argparse.Namespace) -> int:
    """Print every file given; exit 1 if one cannot be read."""
    status = 0
    for name in args.files:
        path = Path(name)
        try:
            if path.suffix == ".json":
                lines = _vector_lines(path)
            else:
                lines = list(format_capture(path.read_bytes()))
        except (OSError, ValueError, KeyError) as exc:
            print(f"virtiofs decode: {name}: {exc}", file=sys.stderr)
            status = 1
            continue
        try:
            if len(args.files) > 1:
                print(f"== {name}")
            for line in lines:
                print(line)
            sys.stdout.flush()
        except BrokenPipeError:
            # `virtiofs decode X | head`: the reader left; stop quietly like other filters.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return status
    return status
