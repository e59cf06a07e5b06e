#!/usr/bin/env bash
# The test suite: sets up the environment if needed, then runs pytest (extra args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/setup_env.sh | tail -n 1)
exec "$py" -m pytest -q "$@"
