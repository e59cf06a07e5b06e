"""Command line for entropy heatmaps with patch outlines (the paper's Figure 2; drawn by entropy_tools.heatmaps).

A figure shows the image on top and, below it, the per-token entropy upsampled to the
image size in a perceptual colormap (viridis), with lines on the edges between tokens of
different patches, a colour bar in nats and a caption.

    python -m entropy_tools.visualize --code-path STORE --indices 0 5 9 --vq-ckpt vq.pt \
        --target-compression 1.81 --out fig.png
    python -m entropy_tools.visualize --code-path STORE --indices 0 5 --data-path IMAGEFOLDER \
        --vq-ckpt vq.pt --entropy-ckpt entropy.pt --generate-ckpt dpar.pt --classes 207 360 --out fig.png

Stored images use the stored entropies (entropy.npy, checked against the store's hash and,
with --entropy-ckpt, the model's). Their pixels are the codes decoded by the VQ (exactly what
the tokens hold, for every view and store layout), or with --data-path the source image's
view as extract_codes.py cropped it: the store keeps no file list, so the ImageFolder's
images are listed again in torchvision's order, the files the manifest records as skipped
are dropped, and the counts and labels must match the store. Generated panels (a GPT or
DPAR checkpoint, --generate-ckpt) go through heatmaps_for_codes: entropies recomputed with
the entropy model, images decoded with the VQ. Every panel draws the patches of the given
patching settings (a DPAR model also generates with them).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from autoregressive.models import model_family, model_from_checkpoint
from autoregressive.models.generate import generate
from dataset.code_store import CodeStore, open_code_store
from dataset.source_images import store_image_paths, stored_view_pixels
from entropy_model.calibrate import PAPER_THRESHOLD, load_entropies, sample_entropies, threshold_for_compression
from entropy_model.patching import GATED_MODES, PATCH_MODES, PatchingConfig
from entropy_tools.heatmaps import code_panels, decode_codes, entropy_heatmap_figure, panel_title, save_figure_grid
from entropy_tools.score import load_entropy_model
from tokenizer.vq_model import VQ_models, load_vq_checkpoint
from utils.identity import checkpoint_sha256, code_store_hash
from utils.cli import HelpFormatter
from utils.distributed import pick_device


def _load_models(
    args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module | None, torch.nn.Module | None, str | None]:
    """(vq or None, entropy model or None, entropy model hash or None) from the flags."""
    vq = load_vq_checkpoint(args.vq_ckpt, args.vq_model).to(device) if args.vq_ckpt else None
    entropy_model, model_hash = None, None
    if args.entropy_ckpt:
        entropy_model = load_entropy_model(args.entropy_ckpt)[0].to(device)
        model_hash = checkpoint_sha256(args.entropy_ckpt)
    return vq, entropy_model, model_hash


def _patching(args: argparse.Namespace, entropy: np.ndarray, grid_width: int) -> PatchingConfig:
    cap = args.max_patch_length or None
    threshold = args.threshold
    if args.target_compression is not None:
        sample = sample_entropies(entropy, 10000, seed=0)  # (S, T)
        threshold, achieved = threshold_for_compression(sample, args.target_compression, cap,
                                                        None if args.no_row_reset else grid_width, args.mode)
        print(f"calibrated tau={threshold:.4f} (compression {achieved:.3f} tokens per patch)")
    return PatchingConfig(args.mode, threshold, cap, not args.no_row_reset)


def _stored_panels(
    args: argparse.Namespace, store: CodeStore, entropy: np.ndarray, vq: torch.nn.Module | None
) -> list[tuple[np.ndarray, torch.Tensor, str]]:
    """(pixels (H, W, 3) uint8, entropies (T,) float32, name) of each requested stored image."""
    paths = store_image_paths(store, args.data_path) if args.data_path else None
    panels = []
    for i in args.indices:
        e = torch.from_numpy(np.asarray(entropy[i, args.view], dtype=np.float32))  # (T,)
        if paths is not None:
            pixels = stored_view_pixels(paths[i], store.manifest, args.view)
        else:
            codes = torch.from_numpy(np.asarray(store.codes[i, args.view], dtype=np.int64))  # (T,)
            pixels = decode_codes(vq, codes, store.grid)[0]
        panels.append((pixels, e, f"#{i}" if store.num_views == 1 else f"#{i} view {args.view}"))
    return panels


@torch.no_grad()
def _generated_codes(
    args: argparse.Namespace,
    entropy_model: torch.nn.Module,
    model_hash: str,
    patching: PatchingConfig,
    device: torch.device,
) -> tuple[torch.Tensor, list[str]]:
    """(B, T) codes sampled from the --generate-ckpt model for --classes, and a name for each."""
    model, model_args = model_from_checkpoint(args.generate_ckpt)
    model.to(device)
    unconditional = getattr(model.config, "model_type", "c2i") == "uncond"
    if not unconditional and not all(0 <= c < model.config.num_classes for c in args.classes):
        raise ValueError(f"--classes must lie in 0..{model.config.num_classes - 1} for {args.generate_ckpt}")
    if (model.config.vocab_size, model.config.block_size) != \
            (entropy_model.config.vocab_size, entropy_model.config.block_size):
        raise ValueError(f"{args.generate_ckpt} makes {model.config.block_size} tokens of {model.config.vocab_size} "
                         f"codes; the entropy model scores {entropy_model.config.block_size} of "
                         f"{entropy_model.config.vocab_size}")
    kwargs = {}
    if model_family(model).patched:
        recorded = model_args.get("entropy_model_hash")
        if recorded is not None and recorded != model_hash:
            raise ValueError(f"{args.generate_ckpt} was trained with entropy model {recorded[:16]}, "
                             f"not {args.entropy_ckpt} ({model_hash[:16]})")
        kwargs = {"entropy_model": entropy_model, "patching": patching}
    cond = torch.tensor(args.classes, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(args.seed)
    codes = generate(model, cond, model.config.block_size, cfg_scale=args.cfg_scale, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, generator=generator, **kwargs).tokens
    names = [f"sample {b}" if unconditional else f"class {c} sample" for b, c in enumerate(args.classes)]
    return codes, names


def make_figure(args: argparse.Namespace) -> Image.Image:
    """The figure the command line describes (stored images, then generated samples)."""
    device = pick_device(args.device)
    store = open_code_store(args.code_path, codebook_size=args.codebook_size)
    if not 0 <= args.view < store.num_views:
        raise ValueError(f"--view {args.view} is outside the store's {store.num_views} views")
    bad = [i for i in args.indices if not 0 <= i < len(store)]
    if bad:
        raise ValueError(f"indices {bad} are outside the store's {len(store)} images")
    vq, entropy_model, model_hash = _load_models(args, device)
    store_hash = code_store_hash(args.code_path, args.verify_store)
    entropy, _ = load_entropies(str(args.entropy_path or args.code_path), store_hash, model_hash,
                                verify=args.verify_store)
    patching = _patching(args, entropy, store.grid_width)
    panels = _stored_panels(args, store, entropy, vq)
    if args.generate_ckpt:
        codes, names = _generated_codes(args, entropy_model, model_hash, patching, device)  # (B, T)
        images, e = code_panels(entropy_model, vq, codes, store.grid)  # (B, H, W, 3), (B, T)
        panels += [(images[b], e[b], name) for b, name in enumerate(names)]
    everything = torch.cat([e for _, e, _ in panels])
    vmin, vmax = (None, None) if args.per_image_scale else (float(everything.min()), float(everything.max()))
    figures = []
    for pixels, e, name in panels:
        starts = patching.starts(e[None], store.grid_width)[0]  # (T,)
        figures.append(entropy_heatmap_figure(pixels, e, starts, store.grid_width, vmin, vmax,
                                              panel_title(name, starts)))
    return save_figure_grid(figures, args.out, args.columns)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Entropy heatmaps with patch outlines (the paper's Figure 2).",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--code-path", required=True, help="code store directory holding entropy.npy")
    parser.add_argument("--entropy-path", default=None, help="directory holding entropy.npy (default: the store)")
    parser.add_argument("--verify-store", action="store_true",
                        help="re-hash codes.npy and entropy.npy against their recorded hashes instead of checking "
                             "size and mtime")
    parser.add_argument("--codebook-size", type=int, default=None, help="for LlamaGen's store layout only")
    parser.add_argument("--indices", type=int, nargs="*", default=[0], help="stored images to show")
    parser.add_argument("--view", type=int, default=0, help="stored view to show (0 = center)")
    parser.add_argument("--data-path", default=None,
                        help="ImageFolder the store was extracted from: show source pixels, not decoded codes")
    parser.add_argument("--vq-model", choices=list(VQ_models), default="VQ-16", help="tokenizer registry name")
    parser.add_argument("--vq-ckpt", default=None, help="VQ tokenizer, decodes codes to images")
    parser.add_argument("--entropy-ckpt", default=None,
                        help="entropy model: checks the stored entropies' model hash; scores generated samples")
    parser.add_argument("--generate-ckpt", default=None, help="GPT or DPAR checkpoint: add panels of its samples")
    parser.add_argument("--classes", type=int, nargs="*", default=[],
                        help="class of each generated sample (an unconditional model draws one sample per entry)")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale of --generate-ckpt sampling")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="softmax temperature of --generate-ckpt sampling")
    parser.add_argument("--top-k", type=int, default=0, help="top-k of --generate-ckpt sampling (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass of --generate-ckpt sampling (1.0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --generate-ckpt sampling")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--threshold", type=float, default=None, help=f"tau in nats (default {PAPER_THRESHOLD})")
    target.add_argument("--target-compression", type=float, default=None,
                        help="calibrate tau on the stored entropies to this many tokens per patch")
    parser.add_argument("--mode", choices=PATCH_MODES, default="entropy", help="patch boundary rule")
    parser.add_argument("--max-patch-length", type=int, default=4, help="length cap; 0 = no cap")
    parser.add_argument("--no-row-reset", action="store_true", help="let patches run across grid rows")
    parser.add_argument("--per-image-scale", action="store_true", help="colour range per image (default: shared)")
    parser.add_argument("--columns", type=int, default=None, help="figures per row (default: one row)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when available")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    if args.max_patch_length < 0:
        parser.error("--max-patch-length must be >= 0")
    if not args.indices and not args.generate_ckpt:
        parser.error("nothing to show: give --indices and/or --generate-ckpt")
    if args.indices and not (args.data_path or args.vq_ckpt):
        parser.error("stored images need --vq-ckpt (decode their codes) or --data-path (source images)")
    if args.generate_ckpt and not (args.vq_ckpt and args.entropy_ckpt and args.classes):
        parser.error("--generate-ckpt needs --vq-ckpt, --entropy-ckpt and --classes (one sample per class)")
    if args.mode not in GATED_MODES and args.target_compression is not None:
        parser.error(f"mode {args.mode!r} has a fixed compression; drop --target-compression")
    if args.mode in GATED_MODES and args.threshold is None and args.target_compression is None:
        args.threshold = PAPER_THRESHOLD
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        figure = make_figure(args)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {args.out} ({figure.width}x{figure.height})")


if __name__ == "__main__":
    main()
