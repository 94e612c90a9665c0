"""Fixtures for the guest harness tests: tools present, one runner per session, C virtiofsd."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtiofs.guest import BackendProcess, GuestRunner, missing_tools, start_c_virtiofsd

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def guest_tools() -> None:
    """QEMU, C virtiofsd and busybox-static, installed through scripts/bootstrap.sh if missing.

    Skips only when they truly cannot be installed (not root, no apt, install failed).
    """
    missing = missing_tools()
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        try:
            subprocess.run(
                ["bash", str(ROOT / "scripts" / "bootstrap.sh"), "--no-pip"],
                timeout=1800,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pass
        missing = missing_tools()
    if missing:
        pytest.skip("guest tools cannot be installed here: " + "; ".join(missing))


@pytest.fixture(scope="session")
def guest_runner(guest_tools: None) -> GuestRunner:
    """A runner with the default 6.12 kernel, fetched once (a fetch failure fails the test)."""
    runner = GuestRunner("6.12")
    _ = runner.kernel  # fetch now so a download problem is reported here
    return runner


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short private directory (AF_UNIX paths are limited to 107 bytes), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="vfs-guest-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def c_virtiofsd(
    guest_tools: None, short_tmp: Path
) -> Iterator[Callable[..., tuple[Path, Path, BackendProcess]]]:
    """Factory: start QEMU's C virtiofsd on a fresh shared directory -> (shared, socket, proc).

    Every process started is stopped by PID and its socket removed, even if the test fails.
    """
    started: list[BackendProcess] = []

    def start(**kwargs: object) -> tuple[Path, Path, BackendProcess]:
        n = len(started)
        shared = short_tmp / f"shared{n}"
        shared.mkdir()
        sock = short_tmp / f"vhost{n}.sock"
        proc = start_c_virtiofsd(shared, sock, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return shared, sock, proc

    try:
        yield start
    finally:
        for proc in started:
            proc.close()
