#!/usr/bin/env bash
# The main job on a fresh machine: install, then boot a Linux guest that mounts a directory
# served by virtiofs (`virtiofs demo --help` for options).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec python3 -m virtiofs demo "$@"
