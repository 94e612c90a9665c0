#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not guest"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec python3 -m pytest -q "$@"
