#!/usr/bin/env bash
# ADM-protocol evaluation (FID, sFID, IS, precision, recall) of a sample .npz.
#
#   scripts/eval_c2i.sh VIRTUAL_imagenet256_labeled.npz samples/GPT-B-....npz
#   scripts/eval_c2i.sh samples/x.npz --ref-folder path/to/imagenet/train --ref-size 256
#
# Environment (defaults): PYTHON (python), DEVICE (auto), BATCH_SIZE (64),
# DPAR_INCEPTION_WEIGHTS (unset: torch hub cache, then a download unless DPAR_OFFLINE=1).
# Every argument is passed on to python -m evaluations.c2i.evaluator.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
DEVICE="${DEVICE:-auto}"
BATCH_SIZE="${BATCH_SIZE:-64}"

if [ "$#" -lt 1 ]; then
    echo "usage: $0 REF.npz SAMPLE.npz [evaluator flags] | SAMPLE.npz --ref-folder DIR [flags]" >&2
    exit 2
fi

export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON}" -m evaluations.c2i.evaluator --device "${DEVICE}" --batch-size "${BATCH_SIZE}" "$@"
