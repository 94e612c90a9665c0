"""Install what the guest harness needs from Debian, for ``virtiofs demo`` on a fresh machine.

The same packages as ``scripts/bootstrap.sh`` (QEMU 7.2, its C virtiofsd, static busybox, cpio),
installed with ``apt-get install --no-install-recommends`` (qemu-system-x86 would otherwise pull
a GUI and firmware never used). Only as root with apt; otherwise the caller reports what is
missing. Every command is bounded by a timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from .kernel import Progress
from .qemu import missing_tools

__all__ = ["GUEST_PACKAGES", "ensure_tools"]

#: Debian packages behind :func:`~virtiofs.guest.qemu.missing_tools`.
GUEST_PACKAGES = ("qemu-system-x86", "qemu-system-common", "busybox-static", "cpio")


def _apt(args: list[str], timeout: float) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "-q", "-o", "DPkg::Lock::Timeout=600", *args], check=True,
                   env=env, timeout=timeout, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def ensure_tools(*, virtiofsd: bool = False, progress: Progress | None = None,
                 timeout: float = 1800.0) -> list[str]:
    """Install the missing guest tools when possible; return what is still missing.

    ``virtiofsd``: QEMU's C virtiofsd is needed too (benchmarks, comparisons).
    """
    missing = missing_tools(virtiofsd=virtiofsd)
    if not missing or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return missing
    say = progress or (lambda _m: None)
    try:
        say("installing " + " ".join(GUEST_PACKAGES) + " with apt-get (once)…")
        try:
            _apt(["install", "-y", "--no-install-recommends", *GUEST_PACKAGES], timeout)
        except subprocess.CalledProcessError:
            say("apt-get update…")
            _apt(["update"], timeout)
            _apt(["install", "-y", "--no-install-recommends", *GUEST_PACKAGES], timeout)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        say(f"apt-get failed: {e}")
    return missing_tools(virtiofsd=virtiofsd)
