#!/usr/bin/env bash
# One-GPU check: decoding speed at batch 256 with guidance, attention backends vs a float64
# reference, GPT vs DPAR training throughput (L at 384 px, B at 256 px; whole-model and
# per-block compile). Each section runs as its own process under its own time limit (a hang or
# a failed CUDA-graph capture cannot take the others down) and adds to OUT/gpu_check.json.
# Usage: [SECTIONS="decoding attention training"] scripts/gpu_check.sh [OUT_DIR] [benchmarks.gpu_check flags]
#   e.g. one device session per call: SECTIONS=decoding ...; then SECTIONS="attention training" ...
#   Flags that name --sections run those sections in one process instead.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/gpu_check}"
shift $(( $# > 0 ? 1 : 0 ))
PYTHON="${PYTHON:-python}"
SECTIONS="${SECTIONS:-decoding attention training}"
GRACE="${GRACE:-90}"  # seconds past a section's own limit (a run in flight finishes) before it is killed
declare -A LIMIT=([decoding]=300 [attention]=60 [training]=300)  # benchmarks.gpu_check.SECTION_LIMITS
for arg in "$@"; do  # sections named on the command line (or --help): one process, as asked
  if [[ "$arg" == --sections || "$arg" == --help || "$arg" == -h ]]; then
    exec "$PYTHON" -m benchmarks.gpu_check --out "$OUT" "$@"
  fi
done
status=0
for section in $SECTIONS; do
  if [[ -z "${LIMIT[$section]:-}" ]]; then
    echo "error: unknown section '$section' (decoding, attention, training)" >&2
    exit 2
  fi
  timeout --signal=TERM --kill-after=10 "$(( ${LIMIT[$section]} + GRACE ))" \
    "$PYTHON" -m benchmarks.gpu_check --out "$OUT" --sections "$section" "$@" || {
    code=$?
    echo "[gpu_check] section $section ended with status $code" >&2
    status=$code
  }
done
exit "$status"
