"""Fetch and cache a Debian guest kernel for the QEMU harness.

Nothing is installed on the host: the kernel package is fetched with ``apt-get download`` and only
the files the guest needs (``boot/vmlinuz-*``, ``boot/config-*`` and, for kernels that build
virtio-fs as modules, the virtio and fuse modules) are unpacked from it into a cache folder
(``~/.cache/virtiofs/guest/`` or ``$VIRTIOFS_CACHE``). See GUEST.md.

Two series are known:

- ``"6.12"`` (``linux-image-6.12-amd64``, the default): virtio-pci, fuse and virtio-fs are built
  in (``CONFIG_VIRTIO_FS=y``); nothing to load. It offers FUSE 7.41 and per-CPU request queues.
- ``"6.1"`` (``linux-image-amd64`` on Debian 12): virtio-fs is ``=m`` and the package ships no
  ``modules.dep``, so :func:`fetch_kernel` computes the insmod order from each module's
  ``depends=`` field and hands back uncompressed ``.ko`` files for the initramfs. FUSE 7.38.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VirtiofsError

__all__ = [
    "KERNEL_SERIES",
    "GuestKernel",
    "KernelFetchError",
    "cache_dir",
    "fetch_kernel",
    "module_load_order",
]

#: Known series -> the Debian metapackage whose first dependency is the real image package.
KERNEL_SERIES: dict[str, str] = {
    "6.12": "linux-image-6.12-amd64",
    "6.1": "linux-image-amd64",
}

#: The modules a guest needs to mount virtio-fs over virtio-pci when they are not built in.
#: Their own dependencies are found from ``depends=``; these are the roots.
_ROOT_MODULES = ("virtio_pci", "virtiofs")
#: Folders of the image package that hold those modules and everything they depend on.
_MODULE_DIRS = ("kernel/drivers/virtio/", "kernel/fs/fuse/")

#: Bumped when the layout of an unpacked kernel in the cache changes.
_LAYOUT = "1"

Progress = Callable[[str], None]


class KernelFetchError(VirtiofsError):
    """The guest kernel could not be resolved, downloaded, unpacked or is unusable."""


@dataclass(frozen=True)
class GuestKernel:
    """An unpacked guest kernel ready to boot.

    ``modules`` are uncompressed ``.ko`` files in insmod order (empty when virtio-fs is built
    in); the initramfs copies them and its ``/init`` loads them before running the script.
    """

    package: str
    release: str
    vmlinuz: Path
    config_path: Path
    config: dict[str, str] = field(repr=False)
    modules: tuple[Path, ...] = ()

    @property
    def virtiofs_builtin(self) -> bool:
        """True when ``CONFIG_VIRTIO_FS=y`` (no module to load)."""
        return self.config.get("CONFIG_VIRTIO_FS") == "y"


def cache_dir() -> Path:
    """The harness cache root: ``$VIRTIOFS_CACHE`` or ``~/.cache/virtiofs/guest``."""
    env = os.environ.get("VIRTIOFS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "virtiofs" / "guest"


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _run(argv: list[str], *, cwd: Path | None = None, timeout: float = 600.0) -> str:
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelFetchError(f"{argv[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise KernelFetchError(
            f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()[-2000:]}"
        )
    return done.stdout


def resolve_package(series_or_package: str) -> str:
    """The binary image package for a series (``"6.12"``, ``"6.1"``) or a metapackage name.

    Follows the metapackage's first ``Depends:`` through ``apt-cache depends`` (local, no
    network); an already concrete image package name is returned as is.
    """
    meta = KERNEL_SERIES.get(series_or_package, series_or_package)
    out = _run(["apt-cache", "depends", meta], timeout=60)
    for line in out.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m and not m.group(1).startswith("<"):
            return m.group(1)
    if re.fullmatch(r"linux-image-\d\S*-amd64", meta):
        return meta
    raise KernelFetchError(f"apt-cache depends {meta}: no linux-image dependency in {out!r}")


def _resolve_cached(series: str, kernels: Path) -> str:
    # apt-cache takes about a second; its answer only changes when the apt lists do.
    try:
        stamp = str(os.stat("/var/lib/apt/lists").st_mtime_ns)
    except OSError:
        stamp = "none"
    memo = kernels / f"resolved-{re.sub(r'[^A-Za-z0-9.+_-]', '_', series)}"
    try:
        package, old_stamp = memo.read_text().split()
        if old_stamp == stamp:
            return package
    except (OSError, ValueError):
        pass
    package = resolve_package(series)
    with contextlib.suppress(OSError):
        kernels.mkdir(parents=True, exist_ok=True)
        memo.write_text(f"{package} {stamp}\n")
    return package


def parse_config(text: str) -> dict[str, str]:
    """``CONFIG_X=value`` lines of a kernel ``.config``; ``# CONFIG_X is not set`` gives ``n``."""
    config: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_"):
            key, _, value = line.partition("=")
            config[key] = value
        else:
            m = re.match(r"# (CONFIG_\w+) is not set", line)
            if m:
                config[m.group(1)] = "n"
    return config


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".gz", ".zst"):
        name = name.removesuffix(suffix)
    # The kernel treats '-' and '_' alike in module names; depends= uses '_'.
    return name.removesuffix(".ko").replace("-", "_")


def _module_depends(data: bytes) -> list[str]:
    # .modinfo holds NUL-separated "key=value" strings; depends= lists direct dependencies.
    for chunk in data.split(b"\0"):
        if chunk.startswith(b"depends="):
            return [d.replace("-", "_") for d in chunk[8:].decode().split(",") if d]
    return []


def _decompress(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(raw)
    if path.suffix == ".gz":
        return gzip.decompress(raw)
    if path.suffix == ".zst":
        raise KernelFetchError(f"{path}: zstd-compressed modules are not supported (stdlib only)")
    return raw


def module_load_order(
    available: dict[str, bytes], roots: tuple[str, ...] = _ROOT_MODULES
) -> list[str]:
    """Dependency-first order of ``roots`` and everything they need (from ``depends=``).

    ``available`` maps module names to uncompressed ``.ko`` bytes. Missing dependencies and
    cycles raise :class:`KernelFetchError`.
    """
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise KernelFetchError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in available:
            raise KernelFetchError(f"module {name} (needed by {' -> '.join(chain)}) not found")
        state[name] = 1
        for dep in _module_depends(available[name]):
            visit(dep, chain + (name,))
        state[name] = 2
        order.append(name)

    for root in roots:
        visit(root, ())
    return order


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two test processes fetching at once must not unpack into the same folder.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _load(package: str, folder: Path) -> GuestKernel:
    vmlinuz = sorted((folder / "boot").glob("vmlinuz-*"))
    configs = sorted((folder / "boot").glob("config-*"))
    if len(vmlinuz) != 1 or len(configs) != 1:
        raise KernelFetchError(f"{folder}: expected one vmlinuz and one config, got {vmlinuz}")
    release = vmlinuz[0].name.removeprefix("vmlinuz-")
    config = parse_config(configs[0].read_text())
    order_file = folder / "modules.load"
    modules: tuple[Path, ...] = ()
    if order_file.exists():
        modules = tuple(
            folder / "ko" / f"{name}.ko" for name in order_file.read_text().split() if name
        )
    return GuestKernel(package, release, vmlinuz[0], configs[0], config, modules)


def _check(kernel: GuestKernel) -> None:
    cfg = kernel.config
    if cfg.get("CONFIG_VIRTIO_FS") not in ("y", "m"):
        raise KernelFetchError(f"{kernel.package}: CONFIG_VIRTIO_FS is not enabled")
    for key in ("CONFIG_VIRTIO_PCI", "CONFIG_FUSE_FS", "CONFIG_VIRTIO"):
        if cfg.get(key) not in ("y", "m"):
            raise KernelFetchError(f"{kernel.package}: {key} is not enabled")
    # An initramfs compressed with gzip and a devtmpfs to mount are what our /init relies on.
    for key in ("CONFIG_RD_GZIP", "CONFIG_DEVTMPFS", "CONFIG_SERIAL_8250_CONSOLE"):
        if cfg.get(key) != "y":
            raise KernelFetchError(f"{kernel.package}: {key} is not y")
    if not kernel.virtiofs_builtin and not kernel.modules:
        raise KernelFetchError(f"{kernel.package}: virtio-fs is a module but none was unpacked")


def _unpack(deb: Path, dest: Path) -> None:
    """Extract boot/vmlinuz-*, boot/config-* and the virtio/fuse modules from ``deb``."""
    dpkg = subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(deb)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert dpkg.stdout is not None
    try:
        with tarfile.open(fileobj=dpkg.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                wanted = (
                    re.fullmatch(r"boot/(vmlinuz|config)-[^/]+", name) is not None
                    or re.fullmatch(r"lib/modules/[^/]+/(kernel/.+\.ko(\.xz|\.gz|\.zst)?)", name)
                    is not None
                    and any(f"/{d}" in name for d in _MODULE_DIRS)
                )
                if wanted and member.isfile():
                    member.name = name
                    tar.extract(member, dest, filter="data")
    finally:
        try:
            _, err = dpkg.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            dpkg.kill()
            dpkg.wait()
            raise KernelFetchError(f"dpkg-deb --fsys-tarfile {deb} timed out") from None
    if dpkg.returncode != 0:
        raise KernelFetchError(f"dpkg-deb --fsys-tarfile {deb}: {err.decode().strip()}")


def _prepare_modules(folder: Path, config: dict[str, str]) -> None:
    if config.get("CONFIG_VIRTIO_FS") != "m":
        return
    available: dict[str, bytes] = {}
    for path in sorted((folder / "lib" / "modules").rglob("*.ko*")):
        available[_module_name(path)] = _decompress(path)
    order = module_load_order(available)
    ko = folder / "ko"
    ko.mkdir()
    for name in order:
        (ko / f"{name}.ko").write_bytes(available[name])
    (folder / "modules.load").write_text("\n".join(order) + "\n")


def fetch_kernel(
    series: str = "6.12",
    *,
    cache: Path | None = None,
    progress: Progress | None = None,
) -> GuestKernel:
    """Return a bootable guest kernel, downloading and unpacking it once into the cache.

    ``series`` is ``"6.12"``, ``"6.1"``, a metapackage or an image package name. The resolved
    package is cached under ``<cache>/kernels/<package>/``; a later call with the same
    resolution touches nothing on the network. ``progress`` receives short human messages
    (resolving, downloading, unpacking) for the ``virtiofs demo`` command.
    """
    root = cache if cache is not None else cache_dir()
    kernels = root / "kernels"
    _say(progress, f"resolving guest kernel {series}…")
    try:
        package = _resolve_cached(series, kernels)
    except KernelFetchError:
        # No apt lists (or no apt) but a previous fetch: use the newest unpacked match.
        pattern = {"6.12": "linux-image-6.12*", "6.1": "linux-image-6.1.*"}.get(series, series)
        cached = [c for c in sorted(kernels.glob(pattern)) if (c / f".complete-{_LAYOUT}").exists()]
        if not cached:
            raise
        kernel = _load(cached[-1].name, cached[-1])
        _check(kernel)
        return kernel
    folder = kernels / package
    with _locked(kernels / ".lock"):
        if not (folder / f".complete-{_LAYOUT}").exists():
            if folder.exists():
                shutil.rmtree(folder)
            kernels.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=kernels, prefix=".fetch-") as tmp:
                work = Path(tmp)
                _say(progress, f"downloading {package} (about 70-110 MB, once)…")
                # As root apt would drop to _apt and warn it cannot write here; stay root.
                _run(
                    ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", package],
                    cwd=work,
                )
                debs = list(work.glob("*.deb"))
                if len(debs) != 1:
                    raise KernelFetchError(f"apt-get download {package} gave {debs}")
                _say(progress, f"unpacking {debs[0].name}…")
                staging = work / "tree"
                staging.mkdir()
                _unpack(debs[0], staging)
                configs = list((staging / "boot").glob("config-*"))
                if len(configs) != 1:
                    raise KernelFetchError(f"{package}: no single boot/config-* in the package")
                _prepare_modules(staging, parse_config(configs[0].read_text()))
                # Module sources are no longer needed once the load set is uncompressed.
                shutil.rmtree(staging / "lib", ignore_errors=True)
                (staging / f".complete-{_LAYOUT}").write_text(package + "\n")
                staging.rename(folder)
        kernel = _load(package, folder)
    _check(kernel)
    _say(progress, f"guest kernel {kernel.release} ready")
    return kernel
