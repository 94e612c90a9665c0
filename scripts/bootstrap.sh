#!/usr/bin/env bash
# Install what the virtiofs project needs on a Debian 12 host. Idempotent: a second run only
# checks (dpkg-query, one python import) and takes well under a second.
#
#   scripts/bootstrap.sh [--no-apt] [--no-pip] [--with-kernel]
#
#   Debian packages: qemu-system-x86 (QEMU 7.2, TCG guests), qemu-system-common (QEMU's C
#   virtiofsd at /usr/lib/qemu/virtiofsd, the reference back-end), busybox-static (guest
#   initramfs), cpio, fio and stress-ng (benchmarks, load).
#   Python: pip install -e .[test,fuzz] for this checkout (skipped when already editable here).
#   --with-kernel: also fetch the guest kernels (6.12 and 6.1) into the harness cache
#   (~/.cache/virtiofs/guest or $VIRTIOFS_CACHE), otherwise the first guest test does it.
#
# Environment: PYTHON (default python3), APT_WAIT (seconds to wait for another apt/dpkg run to
# finish, default 900).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
APT_WAIT=${APT_WAIT:-900}
PACKAGES=(qemu-system-x86 qemu-system-common busybox-static cpio fio stress-ng)

do_apt=1 do_pip=1 do_kernel=0
for arg in "$@"; do
    case "$arg" in
    --no-apt) do_apt=0 ;;
    --no-pip) do_pip=0 ;;
    --with-kernel) do_kernel=1 ;;
    -h | --help)
        sed -n '2,17p' "$0"
        exit 0
        ;;
    *)
        echo "bootstrap: unknown option $arg" >&2
        exit 2
        ;;
    esac
done

log() { echo "bootstrap: $*" >&2; }

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# Another apt/dpkg may be running (an image build, unattended-upgrades, a background install
# logging to /tmp/apt.log): wait for it, bounded, rather than fight over the dpkg lock.
wait_for_apt() {
    local waited=0
    while pgrep -x 'apt|apt-get|dpkg|unattended-upgr' >/dev/null 2>&1; do
        if [ "$waited" -ge "$APT_WAIT" ]; then
            log "another apt/dpkg is still running after ${APT_WAIT}s; giving up"
            return 1
        fi
        [ "$waited" -eq 0 ] && log "waiting for another apt/dpkg run to finish (max ${APT_WAIT}s)"
        sleep 2
        waited=$((waited + 2))
    done
}

has_candidate() {
    apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [^(]'
}

if [ "$do_apt" = 1 ]; then
    # A background install may be half way: wait before judging what is missing.
    if pgrep -x 'apt|apt-get|dpkg|unattended-upgr' >/dev/null 2>&1; then
        wait_for_apt
    fi
    missing=()
    for p in "${PACKAGES[@]}"; do
        installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        SUDO=()
        if [ "$(id -u)" != 0 ]; then
            command -v sudo >/dev/null || { log "need root (or sudo) to install ${missing[*]}"; exit 1; }
            SUDO=(sudo)
        fi
        # Lock::Timeout covers the race between our wait and apt taking the lock.
        APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout="$APT_WAIT")
        need_update=0
        for p in "${missing[@]}"; do has_candidate "$p" || need_update=1; done
        if [ "$need_update" = 1 ]; then
            log "apt-get update"
            wait_for_apt
            "${APT[@]}" update
        fi
        log "apt-get install ${missing[*]}"
        wait_for_apt
        # No recommends: qemu-system-x86 would pull a GUI, OVMF and more we never use.
        "${APT[@]}" install -y --no-install-recommends "${missing[@]}"
    fi
    [ -x /usr/lib/qemu/virtiofsd ] || { log "/usr/lib/qemu/virtiofsd missing after install"; exit 1; }
fi

if [ "$do_pip" = 1 ]; then
    # Editable install of this very checkout, with the test extras, once.
    if ! ROOT="$ROOT" "$PYTHON" - <<'EOF' 2>/dev/null; then
import os, sys
import virtiofs, pytest, hypothesis, mypy, ruff  # noqa: F401
from importlib.metadata import distribution
here = os.path.realpath(os.path.join(os.environ["ROOT"], "virtiofs"))
sys.exit(0 if os.path.realpath(os.path.dirname(virtiofs.__file__)) == here
         and distribution("virtiofs") else 1)
EOF
        log "pip install -e .[test,fuzz]"
        (cd "$ROOT" && "$PYTHON" -m pip install -q -e ".[test,fuzz]")
    fi
fi

if [ "$do_kernel" = 1 ]; then
    (cd "$ROOT" && "$PYTHON" -m virtiofs.guest kernel --series 6.12 --series 6.1)
fi
log "ok"
