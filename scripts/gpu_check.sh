#!/usr/bin/env bash
# One-GPU check: attention backends vs a float64 reference, GPT vs DPAR training throughput
# (B at 256 px, L at 384 px; whole-model and per-block compile) and decoding speed at batch 256
# with guidance.
# Usage: scripts/gpu_check.sh [OUT_DIR] [extra evaluations.gpu_check flags, e.g. --dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/gpu_check}"
shift $(( $# > 0 ? 1 : 0 ))
PYTHON="${PYTHON:-python}"
exec "$PYTHON" -m evaluations.gpu_check --out "$OUT" "$@"
