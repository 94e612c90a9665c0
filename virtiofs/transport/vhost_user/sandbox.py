"""Confine the serving process the way virtiofsd does: ``chroot`` or ``namespace``.

Both modes run the server in a child process and keep a small unconfined supervisor as the
parent: it forwards SIGTERM/SIGINT, waits for the child and removes the vhost-user socket (whose
path is outside the confined view), and a PID namespace needs a fork anyway (``unshare
(CLONE_NEWPID)`` only moves the caller's future children).

- ``chroot``: ``chroot(2)`` into the shared directory once the filesystem has opened what it
  needs (its root and ``/proc/self/fd`` as directory fds). For containers without mount
  privileges. Paths outside the shared directory no longer resolve.
- ``namespace``: new mount, PID and network namespaces (virtiofsd's default). The new root is
  an empty read-only tmpfs holding only ``/proc`` (a fresh procfs for the new PID namespace, so
  ``/proc/self/fd/N`` magic links keep working and show nothing but this process); the old root
  is detached after ``pivot_root(2)``. The shared directory stays reachable only through the
  directory fd the filesystem opened before, the vhost-user socket through its listening fd.

What must happen before entering (the caller's job): import every module the server will need
(nothing can be imported from inside), construct the filesystem, listen on the socket, start no
thread yet (``chroot`` applies to threads sharing the filesystem context; threads created later
inherit it). :func:`run_sandboxed` does the fork and the supervision.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["SANDBOX_MODES", "SANDBOX_SHARED", "SandboxError", "SandboxMode", "enter_chroot", "enter_namespace",
           "run_sandboxed"]

log = logging.getLogger("virtiofs.sandbox")

SandboxMode = Literal["none", "chroot", "namespace"]
SANDBOX_MODES: tuple[str, ...] = ("none", "chroot", "namespace")

# <sched.h>, <sys/mount.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_REC = 16384
MS_BIND = 4096
MS_SLAVE = 1 << 19
MNT_DETACH = 2
_SYS_PIVOT_ROOT = 155  # x86-64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


class SandboxError(OSError):
    """Entering the sandbox failed (the server must not run unconfined then)."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise SandboxError(e, f"{what}: {os.strerror(e)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {target}")


def enter_chroot(root: str | os.PathLike[str]) -> None:
    """``chroot`` into ``root`` and ``chdir("/")`` (needs CAP_SYS_CHROOT)."""
    try:
        os.chroot(root)
        os.chdir("/")
    except OSError as e:
        raise SandboxError(e.errno, f"chroot {os.fspath(root)}: {e.strerror}") from None


#: Where the shared directory appears inside the namespace sandbox.
SANDBOX_SHARED = "/shared"


def enter_namespace(mountpoint: str | os.PathLike[str], shared_dir: str | None) -> str | None:
    """From inside a new PID namespace: new mount and network namespaces, and a new root that
    is an empty read-only tmpfs holding a fresh ``/proc`` and ``shared_dir`` bind-mounted at
    :data:`SANDBOX_SHARED`. Returns the shared directory's path inside (open it *after* this
    call: a directory fd opened before would lead, through ``..``, back into the host tree).

    The tmpfs is mounted over ``mountpoint`` (an empty directory) in the private mount
    namespace only; the host never sees it.
    """
    target = os.fspath(mountpoint)
    _unshare(CLONE_NEWNS | CLONE_NEWNET)
    # Nothing we mount may propagate back to the host's mount namespace.
    _mount(None, "/", None, MS_SLAVE | MS_REC)
    # Opened in the new mount namespace (a bind mount refuses a source from another one) and
    # before the tmpfs hides anything.
    src = -1 if shared_dir is None else os.open(shared_dir,
                                                os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _mount("virtiofs-sandbox", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
               "size=64k,nr_inodes=16,mode=0755")
        os.mkdir(os.path.join(target, "proc"), 0o555)
        # A fresh procfs of the new PID namespace: /proc/self/fd/N works, nothing else shows.
        _mount("proc", os.path.join(target, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        if src >= 0:
            inside = os.path.join(target, SANDBOX_SHARED.lstrip("/"))
            os.mkdir(inside, 0o755)
            _mount(f"/proc/self/fd/{src}", inside, None, MS_BIND | MS_REC)
    finally:
        if src >= 0:
            os.close(src)
    os.chdir(target)
    # pivot_root(".", "."): the old root ends up stacked under the new one, then detached
    # (the trick from pivot_root(2) that virtiofsd uses; no put_old directory needed).
    _check(_libc.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return None if shared_dir is None else SANDBOX_SHARED


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def run_sandboxed(
    mode: SandboxMode,
    child: Callable[[], int],
    *,
    root: str | os.PathLike[str] | None,
    prepare: Callable[[str | None], None] | None = None,
    cleanup: Callable[[], None] | None = None,
    kill_timeout: float = 10.0,
) -> int:
    """Enter the sandbox in a child process, run ``prepare(path)`` and ``child()`` there, and
    return the child's exit status.

    ``root`` is the shared directory (``None``: nothing shared, a fresh empty directory is the
    root and is removed afterwards). ``prepare`` constructs the filesystem from ``path``, the
    shared directory as seen where it runs: for ``chroot`` it runs just *before* the chroot
    (the filesystem opens its root and ``/proc/self/fd`` while they are reachable; its root
    then is the process root, so ``..`` cannot leave it), for ``namespace`` just *after*
    (``/shared``, so that ``..`` ends in the empty tmpfs root). Either way it runs in the
    child: ``/proc/self`` is resolved when opened. The parent forwards SIGTERM/SIGINT/SIGHUP,
    kills the child by PID if it does not end within ``kill_timeout`` s of a forwarded
    signal, and runs ``cleanup()`` (remove the socket) once it is gone. With ``mode == "none"``
    everything runs in this process.
    """
    if mode == "none":
        try:
            if prepare is not None:
                prepare(None if root is None else os.fspath(root))
            return child()
        finally:
            if cleanup is not None:
                cleanup()
    if mode not in ("chroot", "namespace"):
        raise ValueError(f"unknown sandbox mode {mode!r}")
    shared = None if root is None else os.fspath(root)
    # chroot: the shared directory itself (or an empty one); namespace: an empty directory to
    # mount the new root's tmpfs over.
    empty = None
    if root is None or mode == "namespace":
        empty = tempfile.mkdtemp(prefix="virtiofs-sandbox-")
        root = empty
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    # Block the signals across the fork: the child installs its handlers before it can take
    # one (a PID namespace's init ignores signals it has no handler for).
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
    own_pidns = -1
    try:
        if mode == "namespace":
            own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            _unshare(CLONE_NEWPID)
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if empty is not None:
            os.rmdir(empty)
        if own_pidns >= 0:
            _check(_libc.setns(own_pidns, CLONE_NEWPID), "setns back to our PID namespace")
            os.close(own_pidns)
        raise
    if pid and own_pidns >= 0:
        # unshare(CLONE_NEWPID) made *every* later child of this process a member of the new
        # namespace, which dies with its init: go back, or the next fork fails with ENOMEM.
        try:
            _check(_libc.setns(own_pidns, CLONE_NEWPID), "setns back to our PID namespace")
        finally:
            os.close(own_pidns)
    if pid == 0:  # pragma: no cover - runs in the child (tests observe it from outside)
        code = 1
        try:
            if own_pidns >= 0:
                os.close(own_pidns)
            for s in forwarded:
                signal.signal(s, signal.default_int_handler)
            if mode == "chroot":
                if prepare is not None:
                    prepare(shared)
                enter_chroot(root)
            else:
                inside = enter_namespace(root, shared)
                if prepare is not None:
                    prepare(inside)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            code = child()
        except SandboxError as e:
            log.error("cannot enter the %s sandbox: %s (it needs root; --sandbox none runs "
                      "unconfined)", mode, e)
            code = 1
        except KeyboardInterrupt:
            code = 0
        except BaseException:
            log.exception("sandboxed server failed")
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)
    # Supervisor.
    state = {"signalled_at": 0.0}

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
        if not state["signalled_at"]:
            state["signalled_at"] = time.monotonic()

    previous = {s: signal.signal(s, forward) for s in forwarded}
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    try:
        while True:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return 1
            if done:
                return _status(status)
            since = state["signalled_at"]
            if since and time.monotonic() - since > kill_timeout:
                log.error("sandboxed server did not stop; killing pid %d", pid)
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                return _status(status)
            time.sleep(0.05)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if cleanup is not None:
            cleanup()
        if empty is not None:
            try:
                os.rmdir(empty)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.warning("cannot remove %s: %s", empty, e)
