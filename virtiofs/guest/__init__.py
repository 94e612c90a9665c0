"""QEMU guest harness: a Debian kernel, a busybox initramfs and a TCG guest on vhost-user-fs.

Used by the guest tests, the benchmarks and the ``virtiofs demo`` command, so all three run the
very same code. The back-end under test is one argument, the vhost-user socket::

    from virtiofs.guest import FileOpsSuite, start_c_virtiofsd

    with start_c_virtiofsd(shared_dir, sock):           # or: start our back-end on `sock`
        report = FileOpsSuite().run(sock, shared_dir=shared_dir)
    print(report.describe())

Modules: :mod:`.kernel` (fetch and cache the guest kernel), :mod:`.initramfs` (busybox cpio
with an /init), :mod:`.qemu` (runner, console parser, back-end processes), :mod:`.suite` (the
file-operation suite, ``scripts/fileops.sh``), :mod:`.bench` (in-guest timings,
``scripts/bench.sh``). Facts behind the choices: ``shared/docs/GUEST.md``.
"""

from .bench import WORKLOADS, GuestBenchResult, measure_guest, parse_bench_output
from .initramfs import (
    EXIT_MARKER,
    START_MARKER,
    CpioWriter,
    InitramfsError,
    build_initramfs,
    find_static_busybox,
    static_helper,
)
from .kernel import KERNEL_SERIES, GuestKernel, KernelFetchError, cache_dir, fetch_kernel
from .qemu import (
    C_VIRTIOFSD,
    BackendError,
    BackendProcess,
    ConsoleParser,
    GuestError,
    GuestResult,
    GuestRunner,
    LineCallback,
    missing_tools,
    run_guest,
    start_backend,
    start_c_virtiofsd,
)
from .suite import CHECKS, CheckResult, FileOpsSuite, SuiteReport, guest_script, parse_suite_output

__all__ = [
    "C_VIRTIOFSD",
    "CHECKS",
    "EXIT_MARKER",
    "KERNEL_SERIES",
    "START_MARKER",
    "WORKLOADS",
    "BackendError",
    "BackendProcess",
    "CheckResult",
    "ConsoleParser",
    "CpioWriter",
    "FileOpsSuite",
    "GuestBenchResult",
    "GuestError",
    "GuestKernel",
    "GuestResult",
    "GuestRunner",
    "InitramfsError",
    "KernelFetchError",
    "LineCallback",
    "SuiteReport",
    "build_initramfs",
    "cache_dir",
    "fetch_kernel",
    "find_static_busybox",
    "guest_script",
    "measure_guest",
    "missing_tools",
    "parse_bench_output",
    "parse_suite_output",
    "run_guest",
    "start_backend",
    "start_c_virtiofsd",
    "static_helper",
]
