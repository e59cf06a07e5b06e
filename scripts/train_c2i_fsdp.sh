#!/usr/bin/env bash
# LlamaGen's FSDP launcher name: scripts/train_c2i.sh with --data-parallel fsdp (same variables:
# NNODES, NPROC_PER_NODE, NODE_RANK, MASTER_ADDR, MASTER_PORT, MAX_RESTARTS, TORCHRUN).
#
#   NPROC_PER_NODE=8 bash scripts/train_c2i_fsdp.sh --cloud-save-path results --code-path codes/in384 --gpt-model GPT-3B
set -euo pipefail

exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/train_c2i.sh" --data-parallel fsdp "$@"
