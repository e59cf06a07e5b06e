"""Export a training checkpoint (GPT, DPAR, entropy model or VQ) as a release folder:
config.json, model.safetensors and a model card, the layout models are shared in on the hub.

    python export_release.py results/dpar/checkpoints/0400000.pt releases/DPAR-L --vq-ckpt vq_ds16_c2i.pt
    python sample_c2i.py --gpt-ckpt releases/DPAR-L --vq-ckpt vq_ds16_c2i.pt --class-labels 207 360
"""
from autoregressive.export import main

if __name__ == "__main__":
    main()
