"""Shared fixtures: /dev/fuse mounts that never leak, servers run as processes, Hypothesis
profiles.

- ``fuse_mount(fs, **options)``: mount ``fs`` (any ``Filesystem``) at a fresh directory and
  return the ``devfuse.FuseMount``; unmounted at teardown, lazily if it has to be, even when the
  test failed.  ``memfs_mount`` is a ready MemoryFS mount (``allow_other``, so the POSIX checks
  that switch users work).
- ``mount_process(argv, mountpoint)``: start a server process (``virtiofs mount``, an example)
  that mounts at ``mountpoint``, wait until the mount answers, and at teardown kill it by PID
  and unmount whatever it left.
- A session-wide guard fails the run if a FUSE mount is left below pytest's temporary
  directory, after detaching it.

Hypothesis profiles: ``HYPOTHESIS_PROFILE=ci`` (modest counts, no deadline) or ``dev``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# Detailed assertion messages from the shared POSIX checks too.
pytest.register_assert_rewrite("posix_suite")

settings.register_profile("ci", max_examples=50, deadline=None)
settings.register_profile("dev", max_examples=10, deadline=None)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])

REPO = Path(__file__).resolve().parent.parent
DEVFUSE_SKIP = ("needs root" if os.geteuid() != 0 else
                "no /dev/fuse" if not os.path.exists("/dev/fuse") else None)
needs_devfuse = pytest.mark.skipif(DEVFUSE_SKIP is not None, reason=DEVFUSE_SKIP or "")


def _devfuse() -> Any:
    if DEVFUSE_SKIP is not None:
        pytest.skip(DEVFUSE_SKIP)
    from virtiofs.transport import devfuse
    return devfuse


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_fuse_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the session if a FUSE mount is left under pytest's base temp dir (and detach it:
    pytest's own cleanup of old temp dirs would stumble over a dead mount)."""
    yield
    if DEVFUSE_SKIP is not None:
        return
    from virtiofs.transport import devfuse
    base = tmp_path_factory.getbasetemp()
    leaked = devfuse.fuse_mounts_under(base)
    for path in leaked:
        devfuse.lazy_unmount(path)
    assert not leaked, f"FUSE mounts leaked by the tests: {leaked}"


@pytest.fixture
def fuse_mount(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Factory: ``fuse_mount(fs, path=None, **options) -> FuseMount``."""
    devfuse = _devfuse()
    mounts: list[Any] = []

    def make(fs: Any, path: str | os.PathLike[str] | None = None, **options: Any) -> Any:
        mountpoint = Path(path) if path is not None else tmp_path / f"mnt{len(mounts)}"
        mountpoint.mkdir(parents=True, exist_ok=True)
        m = devfuse.mount(fs, mountpoint, **options)
        mounts.append(m)
        return m

    try:
        yield make
    finally:
        for m in reversed(mounts):
            try:
                m.unmount(timeout=5.0)
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass
            devfuse.lazy_unmount(m.mountpoint)


@pytest.fixture
def memfs_mount(fuse_mount: Callable[..., Any]) -> Any:
    """A MemoryFS mounted with ``allow_other``; ``.fs`` is the MemoryFS."""
    from virtiofs.server.memfs import MemoryFS
    return fuse_mount(MemoryFS(), allow_other=True)


def wait_mounted(mountpoint: str | os.PathLike[str], proc: subprocess.Popen[Any] | None = None,
                 timeout: float = 20.0) -> None:
    """Wait until ``mountpoint`` is a FUSE mount (and ``proc`` still runs)."""
    devfuse = _devfuse()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = devfuse.mount_entry(mountpoint)
        if entry is not None and entry.fstype.startswith("fuse"):
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"server exited with {proc.returncode}: {out} {err}")
        time.sleep(0.02)
    raise AssertionError(f"{mountpoint} not mounted within {timeout} s")


@pytest.fixture
def mount_process() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Factory: ``mount_process(argv, mountpoint) -> Popen`` once mounted; killed by PID (and
    the mount detached) at teardown."""
    devfuse = _devfuse()
    started: list[tuple[subprocess.Popen[str], str]] = []

    def start(argv: Sequence[str], mountpoint: str | os.PathLike[str],
              timeout: float = 20.0, **popen: Any) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get(
            "PYTHONPATH", ""))
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=REPO, **popen)
        started.append((proc, os.fspath(mountpoint)))
        wait_mounted(mountpoint, proc, timeout)
        return proc

    try:
        yield start
    finally:
        for proc, mountpoint in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            devfuse.lazy_unmount(mountpoint)


PYTHON = sys.executable
