"""Train a class-conditional GPT (LlamaGen), the unconditional entropy model or DPAR on a code store.

    python train_c2i.py --code-path data/codes --gpt-model GPT-B                       # one process
    torchrun --nproc_per_node 8 train_c2i.py --code-path ... --gpt-model DPAR-L         # DDP
    torchrun --nproc_per_node 8 train_c2i.py ... --data-parallel fsdp                   # FSDP2
    python train_c2i.py --code-path data/codes --gpt-model GPT-S --unconditional        # entropy model

A run folder that already holds checkpoints is resumed from its latest one. See --help.
"""
from autoregressive.train import main

if __name__ == "__main__":
    main()
