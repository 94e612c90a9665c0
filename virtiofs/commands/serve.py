"""``virtiofs serve``: serve a host directory to a QEMU guest over vhost-user (virtiofsd's role).

Both option styles a virtiofsd user knows are accepted::

    virtiofs serve --socket-path /tmp/vfs.sock --shared-dir /srv/share --cache auto
    virtiofs serve --socket-path=/tmp/vfs.sock -o source=/srv/share,cache=auto,xattr

``-o`` lists are parsed strictly, item by item, into the same settings, never re-assembled into
a string: an unknown item, an empty one, an option given twice, or one given both ways is an
error, so a value cannot smuggle another option in (virtiofsd's GHSA-rr59: ``source=/`` overriding
the shared directory; SECURITY.md B6 item 16). Bad options print one line and exit 2.

SIGTERM, SIGINT and SIGHUP stop the server cleanly (the front-end connection is dropped, every
fd and mapping released, the socket removed). Without ``--reconnect`` the server exits when the
front-end goes away, as virtiofsd does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

# Everything the server touches is imported here, before any sandbox is entered: nothing can
# be imported from inside a chroot or a fresh mount namespace.
import virtiofs.server.dispatch  # noqa: F401
import virtiofs.transport.vhost_user.worker  # noqa: F401
from virtiofs.server.filesystem import Filesystem
from virtiofs.server.memfs import MemoryFS
from virtiofs.server.passthrough import PassthroughFS
from virtiofs.server.session import Session
from virtiofs.transport.vhost_user.backend import VhostUserBackend, listen_unix
from virtiofs.transport.vhost_user.dax import DaxVhostUserBackend
from virtiofs.transport.vhost_user.sandbox import SANDBOX_MODES, SandboxError, run_sandboxed

HELP = "Serve a directory to a QEMU guest over vhost-user (the virtiofsd role)"

log = logging.getLogger("virtiofs.serve")

CACHE_MODES = ("auto", "always", "none")
LOG_LEVELS = {
    "off": logging.CRITICAL + 10, "error": logging.ERROR, "err": logging.ERROR,
    "warn": logging.WARNING, "warning": logging.WARNING, "info": logging.INFO,
    "debug": logging.DEBUG, "trace": logging.DEBUG,
}

#: What ``--print-capabilities`` prints (QEMU ``docs/interop/vhost-user.json``: type "fs";
#: "separate-options" = ``--shared-dir``-style options are understood). No "migrate-precopy":
#: dirty logging (LOG_ALL) is not implemented.
CAPABILITIES = {"type": "fs", "features": ["separate-options"]}


class ConfigError(ValueError):
    """A bad command line (exit status 2)."""


@dataclass
class ServeConfig:
    """The settings of one ``virtiofs serve`` run, whichever option style gave them."""

    socket_path: str
    shared_dir: str | None
    memory: bool = False
    cache: str = "auto"
    writeback: bool = False
    xattr: bool = False
    xattrmap: str | None = None
    readonly: bool = False
    announce_submounts: bool = False
    thread_pool_size: int = 0
    sandbox: str = "namespace"
    log_level: str = "info"
    reconnect: bool = False
    tag: str | None = None
    socket_mode: int | None = None
    cache_size: int = 0
    """DAX window size offered to front-ends that speak SHMEM_MAP (0: no DAX)."""


def parse_size(text: str) -> int:
    """``"64M"`` -> 67108864; a ``ConfigError`` for anything else."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    body, unit = (text[:-1], text[-1].upper()) if text[-1:].isalpha() else (text, "")
    if unit not in units or not body.isdigit():
        raise ConfigError(f"bad size {text!r} (a number with an optional K, M or G suffix)")
    return int(body) * units[unit]


# -- -o parsing --------------------------------------------------------------------------------

# item -> (setting, value); "=" items take their value from the item.
_O_FLAGS: dict[str, tuple[str, Any]] = {
    "xattr": ("xattr", True), "no_xattr": ("xattr", False),
    "writeback": ("writeback", True), "no_writeback": ("writeback", False),
    "announce_submounts": ("announce_submounts", True),
    "readonly": ("readonly", True),
}
_O_VALUES = {"source": "shared_dir", "cache": "cache", "sandbox": "sandbox",
             "log_level": "log_level", "xattrmap": "xattrmap",
             "thread_pool_size": "thread_pool_size"}


def parse_o_options(values: list[str]) -> dict[str, Any]:
    """``-o`` lists -> settings. Strict: unknown/empty/duplicate items raise :class:`ConfigError`.

    Items are separated by commas; a value can therefore never contain one, and there is no
    escaping: paths with commas go through ``--shared-dir``, which is taken literally.
    """
    out: dict[str, Any] = {}
    for value in values:
        for item in value.split(","):
            if not item:
                raise ConfigError(f"empty item in -o {value!r}")
            key, eq, val = item.partition("=")
            if key in _O_FLAGS and not eq:
                setting, v = _O_FLAGS[key]
            elif key in _O_VALUES and eq:
                setting, v = _O_VALUES[key], val
                if not val:
                    raise ConfigError(f"-o {key}= needs a value")
                if key == "cache" and val == "never":
                    v = "none"  # Rust virtiofsd's name for it
            elif key in _O_FLAGS or key in _O_VALUES:
                raise ConfigError(f"-o {key}: " + ("takes no value" if eq else "needs =VALUE"))
            else:
                raise ConfigError(f"unknown -o option {key!r}")
            if setting in out:
                raise ConfigError(f"-o {key} given twice (or with its opposite)")
            out[setting] = v
    return out


# -- argparse ----------------------------------------------------------------------------------

def _one_line_error(parser: argparse.ArgumentParser) -> None:
    def error(message: str) -> NoReturn:
        print(f"virtiofs serve: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]
    # Unknown arguments would otherwise reach the top-level parser, which prints its usage too.
    parse_known = parser.parse_known_args

    def parse_known_args(args: Any = None, namespace: Any = None) -> Any:
        ns, extras = parse_known(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options (virtiofsd's names where it has them)."""
    _one_line_error(parser)
    parser.add_argument("--socket-path", help="vhost-user socket to create (QEMU connects)")
    parser.add_argument("--shared-dir", help="directory to serve")
    parser.add_argument("--memory", action="store_true",
                        help="serve an empty in-memory filesystem instead of a directory")
    parser.add_argument("-o", action="append", default=[], metavar="OPTS",
                        help="virtiofsd-style list: source=DIR,cache=MODE,xattr,no_xattr,"
                             "writeback,announce_submounts,sandbox=MODE,log_level=L,readonly")
    parser.add_argument("--cache", choices=CACHE_MODES, default=None,
                        help="auto (1 s timeouts, default), always, none")
    parser.add_argument("--writeback", action="store_true", default=None,
                        help="enable the guest's writeback cache")
    parser.add_argument("--xattr", action="store_true", default=None,
                        help="serve extended attributes")
    parser.add_argument("--xattrmap", default=None, help="virtiofsd xattr mapping rules")
    parser.add_argument("--readonly", action="store_true", default=None,
                        help="refuse every modification (EROFS), whatever the guest mounts")
    parser.add_argument("--announce-submounts", action="store_true", default=None,
                        help="flag directories on other host filesystems as submounts")
    parser.add_argument("--cache-size", default="0", metavar="SIZE",
                        help="offer a DAX window of SIZE bytes (K/M/G suffixes, a multiple of "
                             "2M) to front-ends that speak SHMEM_MAP; 0 (default): no DAX")
    parser.add_argument("--thread-pool-size", type=int, default=None, metavar="N",
                        help="serve requests on N threads (0, the default: in each queue's thread)")
    parser.add_argument("--sandbox", choices=SANDBOX_MODES, default=None,
                        help="namespace (default), chroot or none")
    parser.add_argument("--log-level", choices=sorted(LOG_LEVELS), default=None)
    parser.add_argument("--tag", default=None,
                        help="virtio-fs tag answered to GET_CONFIG (front-ends that ask)")
    parser.add_argument("--reconnect", action="store_true",
                        help="keep serving the next front-end when one disconnects")
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the vhost-user back-end capabilities (JSON) and exit")


_SEPARATE = ("shared_dir", "cache", "writeback", "xattr", "xattrmap", "readonly",
             "announce_submounts", "thread_pool_size", "sandbox", "log_level")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Merge both option styles into a :class:`ServeConfig`; :class:`ConfigError` if bad."""
    merged = parse_o_options(args.o)
    for name in _SEPARATE:
        value = getattr(args, name)
        if value is None:
            continue
        if name in merged:
            raise ConfigError(f"--{name.replace('_', '-')} given both separately and with -o")
        merged[name] = value
    if not args.socket_path:
        raise ConfigError("--socket-path is required")
    cfg = ServeConfig(socket_path=args.socket_path, shared_dir=merged.pop("shared_dir", None),
                      memory=args.memory, reconnect=args.reconnect, tag=args.tag,
                      cache_size=parse_size(args.cache_size))
    for name, value in merged.items():
        setattr(cfg, name, value)
    if cfg.cache not in CACHE_MODES:
        raise ConfigError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cfg.cache!r}")
    if cfg.sandbox not in SANDBOX_MODES:
        raise ConfigError(f"sandbox must be one of {', '.join(SANDBOX_MODES)}")
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(sorted(LOG_LEVELS))}")
    try:
        cfg.thread_pool_size = int(cfg.thread_pool_size)
    except ValueError:
        raise ConfigError("thread pool size must be a number") from None
    if not 0 <= cfg.thread_pool_size <= 1024:
        raise ConfigError("thread pool size must be in 0..1024")
    if cfg.memory == (cfg.shared_dir is not None):
        raise ConfigError("give exactly one of --shared-dir (or -o source=) and --memory")
    if cfg.shared_dir is not None and not os.path.isdir(cfg.shared_dir):
        raise ConfigError(f"shared directory {cfg.shared_dir!r} is not a directory")
    if cfg.cache_size and (cfg.memory or cfg.cache_size % (2 << 20)):
        raise ConfigError("--cache-size needs --shared-dir and a multiple of 2 MiB (the DAX "
                          "range size of Linux guests)")
    if cfg.writeback and cfg.cache == "none":
        raise ConfigError("--writeback needs caching (not with cache=none)")
    if cfg.tag is not None and not 0 < len(cfg.tag.encode()) <= 36:
        raise ConfigError("--tag must be 1..36 bytes")
    sock = Path(cfg.socket_path)
    if not sock.parent.is_dir():
        raise ConfigError(f"socket directory {str(sock.parent)!r} does not exist")
    if len(os.fsencode(sock)) > 107:
        raise ConfigError("socket path longer than 107 bytes (AF_UNIX limit)")
    if sock.is_symlink() or (sock.exists() and not stat.S_ISSOCK(sock.stat().st_mode)):
        raise ConfigError(f"{cfg.socket_path!r} exists and is not a socket")
    return cfg


def make_filesystem(cfg: ServeConfig, shared_dir: str | None = None) -> Filesystem:
    """The filesystem a config serves, rooted at ``shared_dir`` (default: the configured one;
    inside a sandbox it has another path). Opens its root now: call it where it is used."""
    if cfg.memory:
        return MemoryFS(cache=cfg.cache, writeback=cfg.writeback)
    root = shared_dir or cfg.shared_dir
    assert root is not None
    # Kernel passthrough needs /dev/fuse ioctls; over vhost-user there is none.
    return PassthroughFS(root, cache=cfg.cache,  # type: ignore[arg-type]
                         writeback=cfg.writeback, xattr=cfg.xattr, readonly=cfg.readonly,
                         xattrmap=cfg.xattrmap, announce_submounts=cfg.announce_submounts,
                         passthrough=False)


def serve(cfg: ServeConfig) -> int:
    """Run the server described by ``cfg`` (blocking); the exit status."""
    try:
        listener = listen_unix(cfg.socket_path, cfg.socket_mode)
    except OSError as e:
        print(f"virtiofs serve: error: cannot listen on {cfg.socket_path}: {e.strerror}",
              file=sys.stderr)
        return 1
    box: dict[str, Filesystem] = {}

    def prepare(shared_dir: str | None) -> None:
        box["fs"] = make_filesystem(cfg, shared_dir)

    def child() -> int:
        fs = box["fs"]
        options: dict[str, Any] = {}
        backend_class: type[VhostUserBackend] = VhostUserBackend
        if cfg.cache_size:
            backend_class, options["dax_window"] = DaxVhostUserBackend, cfg.cache_size
        backend = backend_class(lambda: Session(fs), listener=listener,
                                reconnect=cfg.reconnect,
                                thread_pool_size=cfg.thread_pool_size, tag=cfg.tag, **options)

        def stop(signum: int, _frame: object) -> None:
            log.info("signal %d: stopping", signum)
            backend.stop()

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, stop)
        log.info("listening on %s (%s, cache=%s, sandbox=%s)", cfg.socket_path,
                 "memory" if cfg.memory else cfg.shared_dir, cfg.cache, cfg.sandbox)
        try:
            backend.serve_forever()
        finally:
            backend.close()
            close = getattr(fs, "close", None)
            if callable(close):
                close()
        return 0

    def cleanup() -> None:
        listener.close()
        _remove_socket(cfg.socket_path)

    root = None if cfg.memory else cfg.shared_dir
    try:
        return run_sandboxed(cfg.sandbox, child, root=root, prepare=prepare,  # type: ignore[arg-type]
                             cleanup=cleanup)
    except SandboxError as e:
        print(f"virtiofs serve: error: {e} (--sandbox {cfg.sandbox} needs root; "
              "--sandbox none runs unconfined)", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"virtiofs serve: error: {e}", file=sys.stderr)
        return 1


def _remove_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def run(args: argparse.Namespace) -> int:
    """Entry point of ``virtiofs serve``."""
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES, indent=2))
        return 0
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"virtiofs serve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=LOG_LEVELS[cfg.log_level], stream=sys.stderr,
                        format="[%(asctime)s %(levelname)s %(name)s] %(message)s")
    return serve(cfg)
