#!/usr/bin/env bash
# Build, test, sanitise and benchmark vitmad on this machine's GPU, offline, within 8 minutes; every result in OUT.
# Usage: bash benchmarks/gpu_check.sh OUT [--budget SECONDS] [--skip-build]   (details: benchmarks/gpu_check.py)
# Without a GPU it checks its arguments, says so and exits 0. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
