#!/usr/bin/env bash
# The test suite: sets up the environment if needed, then runs pytest (extra args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/setup_env.sh | tail -n 1)
# idle OpenMP threads sleep instead of spinning: tiny-model tests stay fast on a busy 2-core machine
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$py" -m pytest -q "$@"
