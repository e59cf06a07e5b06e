#!/usr/bin/env bash
# Launch train_c2i.py under torchrun, on one node or several; every argument goes to train_c2i.py.
#
#   one node, 8 GPUs:  NPROC_PER_NODE=8 bash scripts/train_c2i.sh --code-path codes/imagenet256 --gpt-model GPT-B
#   two nodes:         on node i (0 or 1):
#                      NNODES=2 NODE_RANK=i MASTER_ADDR=<node 0 address> NPROC_PER_NODE=8 bash scripts/train_c2i.sh ...
#   elastic restarts:  MAX_RESTARTS=3 ...  (a restarted job resumes from the run folder's latest checkpoint)
#   CPU smoke test:    NPROC_PER_NODE=2 bash scripts/train_c2i.sh --code-path ... --gpt-model GPT-T --device cpu
set -euo pipefail

NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
TORCHRUN="${TORCHRUN:-torchrun}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

exec "$TORCHRUN" \
    --nnodes="$NNODES" \
    --nproc_per_node="$NPROC_PER_NODE" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$MASTER_PORT" \
    --max-restarts="$MAX_RESTARTS" \
    "$REPO/train_c2i.py" "$@"
