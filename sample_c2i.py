"""Sample from a GPT (LlamaGen) or DPAR checkpoint: a PNG grid of chosen classes, or N images
packed into an .npz for FID (--num-fid-samples, single process or torchrun).

    python sample_c2i.py --gpt-ckpt CKPT --vq-ckpt VQ --class-labels 207 360 --out grid.png
    torchrun --nproc_per_node 8 sample_c2i.py --gpt-ckpt CKPT --vq-ckpt VQ \
        --num-fid-samples 50000 --image-size-eval 256 --sample-dir samples/run
"""
from autoregressive.sample import main

if __name__ == "__main__":
    main()
