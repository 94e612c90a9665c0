"""The ``virtiofs`` command line: one subcommand per module in ``virtiofs.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when chosen, so ``virtiofs decode`` does not pay
for QEMU helpers.  Bad options exit 2 with a one-line error (argparse's convention).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, str] = {
    "serve": "Serve a directory to a QEMU guest over vhost-user (the virtiofsd role)",
    "mount": "Mount a directory or a memory filesystem on this host through /dev/fuse",
    "demo": "Boot a Linux guest that mounts a directory served by virtiofs",
    "probe": "Run a conformance suite against any vhost-user-fs backend",
    "decode": "Print a capture of FUSE messages readably",
    "capture": "Mount a capture filesystem and record the kernel's FUSE requests",
}


def _module(name: str) -> object:
    return importlib.import_module(f"virtiofs.commands.{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtiofs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            try:
                mod = _module(name)
            except ModuleNotFoundError:
                continue
            mod.add_arguments(p)  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in args_list if a in COMMANDS), None)
    parser = build_parser(chosen)
    args = parser.parse_args(args_list)
    if not args.command:
        parser.print_help()
        return 2
    try:
        mod = _module(args.command)
    except ModuleNotFoundError:
        parser.error(f"'{args.command}' is not available in this build")
    result: int = mod.run(args)  # type: ignore[attr-defined]
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
