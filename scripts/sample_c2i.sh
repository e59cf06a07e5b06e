#!/usr/bin/env bash
# Sample images for FID with torchrun (all GPUs of this node by default), pack them into
# $SAMPLE_DIR.npz, then score them with scripts/eval_c2i.sh when REF_BATCH is set.
#
#   GPT_CKPT=results/run/checkpoints/0300000.pt VQ_CKPT=vq_ds16_c2i.pt \
#   [ENTROPY_CKPT=entropy.pt] [REF_BATCH=VIRTUAL_imagenet256_labeled.npz] scripts/sample_c2i.sh [sample_c2i.py flags]
#
# LlamaGen's lines work too: the checkpoints as flags instead of variables,
#   bash scripts/sample_c2i.sh --vq-ckpt vq_ds16_c2i.pt --gpt-ckpt c2i_B.pt --gpt-model GPT-B --image-size 384 ...
# (then sample_c2i.py names the sample folder; set SAMPLE_DIR as well to score it with REF_BATCH).
#
# LlamaGen's FID defaults: 50000 images, evaluated at 256 px, 32 images per GPU, top-k 0.
# Unless CFG_SCALE is set, sample_c2i.py uses LlamaGen's guidance scale for the model size
# (GPT-B/L 2.0, XL/XXL 1.75, 3B 1.65, other sizes 1.5); a DPAR model uses the scale of the GPT
# of its size. DPAR models take their patching rule from the checkpoint (override with
# --threshold / --max-patch-length). Flags after the script name go to sample_c2i.py last.
# An interrupted run resumes: rerun the same command and only missing images are generated; the
# sample folder records the checkpoints (by content) and settings that made it and refuses others.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GPT_CKPT=${GPT_CKPT:-}
VQ_CKPT=${VQ_CKPT:-}
TORCHRUN=${TORCHRUN:-torchrun}
GPUS=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NUM_FID_SAMPLES=${NUM_FID_SAMPLES:-50000}
IMAGE_SIZE_EVAL=${IMAGE_SIZE_EVAL:-256}
PER_PROC_BATCH_SIZE=${PER_PROC_BATCH_SIZE:-32}
SEED=${SEED:-0}
CFG_SCALE=${CFG_SCALE:-}
ENTROPY_CKPT=${ENTROPY_CKPT:-}
REF_BATCH=${REF_BATCH:-}
if [[ -n "$GPT_CKPT" ]]; then
    CKPT_NAME=$(basename "${GPT_CKPT%/}")
    SAMPLE_DIR=${SAMPLE_DIR:-samples/${CKPT_NAME%.pt}-cfg${CFG_SCALE:-default}-eval${IMAGE_SIZE_EVAL}-seed${SEED}}
fi
SAMPLE_DIR=${SAMPLE_DIR:-}
if [[ -n "$REF_BATCH" && -z "$SAMPLE_DIR" ]]; then
    echo "error: REF_BATCH needs SAMPLE_DIR (or GPT_CKPT) to know which samples to score" >&2
    exit 1
fi

args=(--num-fid-samples "$NUM_FID_SAMPLES" --image-size-eval "$IMAGE_SIZE_EVAL"
      --per-proc-batch-size "$PER_PROC_BATCH_SIZE" --seed "$SEED")
if [[ -n "$GPT_CKPT" ]]; then args+=(--gpt-ckpt "$GPT_CKPT"); fi
if [[ -n "$VQ_CKPT" ]]; then args+=(--vq-ckpt "$VQ_CKPT"); fi
if [[ -n "$SAMPLE_DIR" ]]; then args+=(--sample-dir "$SAMPLE_DIR"); fi
if [[ -n "$CFG_SCALE" ]]; then args+=(--cfg-scale "$CFG_SCALE"); fi
if [[ -n "$ENTROPY_CKPT" ]]; then args+=(--entropy-ckpt "$ENTROPY_CKPT"); fi

"$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$ROOT/sample_c2i.py" "${args[@]}" "$@"

if [[ -n "$REF_BATCH" && "$NODE_RANK" == 0 ]]; then
    bash "$ROOT/scripts/eval_c2i.sh" "$REF_BATCH" "${SAMPLE_DIR%/}.npz"
fi
