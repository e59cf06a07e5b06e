#!/usr/bin/env bash
# The first command of the README: sets up the environment (once), then runs the whole DPAR
# pipeline offline on synthetic data and writes the replication report (demo_out/report.md).
#   bash scripts/demo.sh               # about 30 minutes on a 2-core CPU
#   bash scripts/demo.sh --quick       # under 10 minutes, smaller everything
#   bash scripts/demo.sh --full        # adds the static-patch model and the multi-resolution study
#   bash scripts/demo.sh --help        # every flag (sizes, seeds, paths, --device, --force)
# Rerunning continues where an interrupted run stopped. Extra arguments pass to python -m demo.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/setup_env.sh | tail -n 1)
# idle OpenMP threads sleep instead of spinning (a spinning team slows every stage on a shared machine)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$py" -m demo "$@"
