"""``virtiofs mount``: serve a directory (PassthroughFS) or a memory filesystem through
/dev/fuse, in the foreground, until unmounted or SIGINT/SIGTERM.

    virtiofs mount SOURCE MOUNTPOINT [--cache auto|always|none] [--writeback] [--xattr]
                   [--threads N] [--allow-other] [--log-level L]
    virtiofs mount --memory [MOUNTPOINT options...]

Mounts with ``default_permissions`` (the kernel checks permissions from our attributes).
Usage errors, a missing SOURCE or MOUNTPOINT and a busy mount point print one line and exit 2;
a mount(2) failure (not root, no /dev/fuse) exits 1.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from typing import Any

HELP = "Mount a directory or a memory filesystem on this host through /dev/fuse"

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be between 1 and 64, not {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``virtiofs mount``."""
    parser.add_argument("source", nargs="?", metavar="SOURCE",
                        help="directory to serve (omit with --memory)")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="where to mount")
    parser.add_argument("--memory", action="store_true",
                        help="serve an empty in-memory filesystem (MemoryFS) instead of SOURCE")
    parser.add_argument("--cache", choices=("auto", "always", "none"), default="auto",
                        help="kernel caching of entries, attributes and data (default auto)")
    parser.add_argument("--writeback", action="store_true",
                        help="let the kernel cache writes (FUSE writeback cache)")
    parser.add_argument("--xattr", action="store_true",
                        help="serve extended attributes of SOURCE (PassthroughFS)")
    parser.add_argument("--no-passthrough", dest="passthrough", action="store_false",
                        help="serve reads and writes in Python instead of kernel passthrough "
                             "I/O (FUSE_PASSTHROUGH, used by default when the kernel offers it)")
    parser.add_argument("--threads", type=_positive, default=2, metavar="N",
                        help="reader threads on /dev/fuse (default 2)")
    parser.add_argument("--allow-other", action="store_true",
                        help="let users other than the mounting one in")
    parser.add_argument("--log-level", type=str.upper, choices=_LEVELS, default="WARNING",
                        metavar="L", help="DEBUG, INFO, WARNING (default) or ERROR")


def _fail(message: str, code: int = 2) -> int:
    print(f"virtiofs mount: error: {message}", file=sys.stderr)
    return code


def _filesystem(args: argparse.Namespace) -> Any:
    if args.memory:
        from ..server.memfs import MemoryFS

        return MemoryFS(cache=args.cache, writeback=args.writeback)
    try:
        module = importlib.import_module("virtiofs.server.passthrough")
        passthrough = module.PassthroughFS
    except (ImportError, AttributeError):
        raise LookupError("PassthroughFS (virtiofs.server.passthrough) is not available in "
                          "this build; use --memory") from None
    return passthrough(args.source, cache=args.cache, writeback=args.writeback,
                       xattr=args.xattr,
                       passthrough="auto" if getattr(args, "passthrough", True) else False)


def run(args: argparse.Namespace) -> int:
    """Mount and serve until unmounted or signalled."""
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.memory and args.source is not None:
        return _fail("give either SOURCE or --memory, not both")
    if not args.memory:
        if args.source is None:
            return _fail("SOURCE is required (or --memory)")
        if not os.path.isdir(args.source):
            return _fail(f"source {args.source} is not a directory")
    mountpoint = args.mountpoint
    from ..transport.devfuse import is_mountpoint, serve

    if not os.path.isdir(mountpoint):
        return _fail(f"mount point {mountpoint} does not exist or is not a directory")
    if is_mountpoint(mountpoint):
        return _fail(f"mount point {mountpoint} is busy (already a mount point)")
    try:
        fs = _filesystem(args)
    except (LookupError, ValueError) as exc:
        return _fail(str(exc))
    fsname = "memfs" if args.memory else os.path.abspath(args.source)
    try:
        return serve(fs, mountpoint, fsname=fsname, allow_other=args.allow_other,
                     threads=args.threads)
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.ENOENT, errno.ENOTDIR):
            return _fail(f"cannot mount on {mountpoint}: {exc.strerror}")
        return _fail(f"mount failed: {exc.strerror or exc}", 1)
    finally:
        close = getattr(fs, "close", None)
        if callable(close):
            close()
