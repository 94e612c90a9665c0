"""Outside suites, bounded: stress-ng filesystem stressors with ``--verify`` and fio with
``verify=crc32c`` on a /dev/fuse PassthroughFS mount and a MemoryFS mount, beside a plain
directory in the same run (issue #6; the full matrix is ``benchmarks/outside_suites.py``).

A row may fail on the plain directory for reasons of the host (then it says nothing about us);
what must hold is that every row passing on the plain directory passes on both mounts, and that
both servers are still alive and answering afterwards.  About 60 s in all.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.devfuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse"),
    pytest.mark.skipif(shutil.which("stress-ng") is None or shutil.which("fio") is None,
                       reason="stress-ng/fio not installed (scripts/bootstrap.sh)"),
]

ROOT = Path(__file__).resolve().parent.parent
STRESSORS = ["dir", "dentry", "rename", "link", "symlink", "chmod", "chown", "utime", "xattr",
             "fallocate", "lockf", "flock", "hdd", "seek", "readahead", "filename", "fstat",
             "lockofd", "mknod", "getdent"]
FIO_JOBS = ["fio seq-write 1M psync", "fio rand-write 4K libaio qd16"]


def _suites() -> Any:
    spec = importlib.util.spec_from_file_location("outside_suites",
                                                  ROOT / "benchmarks" / "outside_suites.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["outside_suites"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report() -> Any:
    suites = _suites()
    rep = suites.run(STRESSORS, suites.TARGETS, ops=20, timeout=2.0, fio=True,
                     fio_jobs=FIO_JOBS, progress=False)
    print(rep.table())
    return rep


@pytest.mark.parametrize("row", STRESSORS + FIO_JOBS)
def test_row_passing_on_a_plain_directory_passes_on_our_mounts(report: Any, row: str) -> None:
    cells = report.cells[row]
    if cells["plain"].status != "PASS":
        pytest.skip(f"{row} does not pass on a plain directory here: {cells['plain'].detail}")
    for target in ("passthrough", "memfs"):
        cell = cells[target]
        assert cell.status in ("PASS", "SKIP"), f"{row} on {target}: {cell.status} {cell.detail}"


def test_servers_survived_every_row(report: Any) -> None:
    assert not any(report.restarts.values()), report.restarts
    # Bounded memory after the whole run (a Python server is ~30 MiB at rest).
    for target, rss in report.server_rss_kib.items():
        assert rss is not None and rss < 512 * 1024, f"{target} server RSS {rss} KiB"


@pytest.mark.guest
def test_outside_suites_inside_the_guest() -> None:
    """Where it fits: not in our guest.  The guest's initramfs (virtiofs/guest/initramfs.py)
    holds only a static busybox and the test script; Debian's stress-ng and fio are dynamically
    linked against 26 and 63 host libraries (ldd), so they do not run there, and the guest-side
    checks are the harness's own fileops suite (tests/guest/)."""
    from virtiofs.guest import initramfs
    assert "busybox" in (initramfs.__doc__ or "")
    pytest.skip("the busybox guest has no stress-ng/fio (dynamically linked Debian binaries); "
                "the in-guest coverage is tests/guest/test_vhost_user_guest.py's fileops suite")
