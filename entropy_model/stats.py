"""Patch statistics that set DPAR's compute: patches per image, compression, length
distribution, and patch count against token count across code stores (image sizes).

The patch transformer runs over M positions per image (M_max of the batch when training
pads patches), so besides the mean patch count this reports the batch-padded count.

    python -m entropy_model.stats --code-path STORE256 STORE384 --threshold 7.8 --json stats.json

With --target-compression, tau is calibrated on the first store and applied to all of
them, as the paper uses one tau for every image size.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

import numpy as np
import torch

from entropy_model.calibrate import (
    PAPER_THRESHOLD,
    read_entropy_file,
    sample_entropies,
    store_grid_width,
    threshold_for_compression,
)
from entropy_model.patching import GATED_MODES, PATCH_MODES, PatchingConfig
from utils.cli import HelpFormatter


def patch_statistics(lengths: torch.Tensor, batch_size: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Statistics of zero-padded patch lengths (B, M) over B images of T tokens each.

    batch_size: if given, images are shuffled into batches of this size and
    "padded_patches_per_image" is the mean over batches of the largest patch count,
    the patch positions a padded training batch actually computes.
    """
    counts = (lengths > 0).sum(dim=1).double()  # (B,) patches per image
    tokens = int(lengths[0].sum())
    histogram = torch.bincount(lengths[lengths > 0])
    stats: dict[str, Any] = {
        "num_images": lengths.shape[0],
        "tokens_per_image": tokens,
        "patches_per_image": counts.mean().item(),
        "patches_per_image_std": counts.std().item() if counts.numel() > 1 else 0.0,
        "patches_per_image_min": int(counts.min()),
        "patches_per_image_max": int(counts.max()),
        "patches_per_image_p99": float(np.quantile(counts.numpy(), 0.99)),
        "compression": tokens * lengths.shape[0] / counts.sum().item(),
        "length_histogram": {str(n): int(c) for n, c in enumerate(histogram.tolist()) if c},
        "token_share_by_length": {
            str(n): n * int(c) / (tokens * lengths.shape[0]) for n, c in enumerate(histogram.tolist()) if c
        },
    }
    if batch_size is not None:
        perm = torch.randperm(counts.numel(), generator=torch.Generator().manual_seed(seed))
        batch_max = torch.stack([b.max() for b in counts[perm].split(batch_size)])  # (num_batches,)
        stats["batch_size"] = batch_size
        stats["padded_patches_per_image"] = batch_max.mean().item()
    return stats


def store_statistics(
    code_path: str,
    config: PatchingConfig,
    sample: int | None = 10000,
    batch_size: int | None = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """patch_statistics for a code store's stored entropies, with its image size and grid."""
    entropy, _ = read_entropy_file(code_path)
    grid_width = store_grid_width(code_path, entropy.shape[-1])
    entropies = sample_entropies(entropy, sample, seed)  # (S, T)
    lengths = config.lengths(entropies, grid_width)  # (S, M)
    manifest_path = os.path.join(code_path, "manifest.json")
    image_size = None
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            image_size = json.load(f).get("image_size")
    return {
        "code_path": code_path,
        "image_size": image_size,
        "grid": [entropies.shape[1] // grid_width, grid_width],
        "patching": config.to_dict(),
        **patch_statistics(lengths, batch_size, seed),
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per store: size, tokens, patches per image, compression, padded patches, length shares."""
    max_len = max(max(int(k) for k in r["length_histogram"]) for r in rows)
    shown = list(range(1, min(max_len, 8) + 1))
    header = f"{'store':<28} {'size':>5} {'grid':>7} {'T':>5} {'tau':>8} {'M mean':>8} {'M std':>7} " \
             f"{'M p99':>7} {'M pad':>7} {'T/M':>6} " + " ".join(f"{'L=' + str(n):>6}" for n in shown)
    lines = [header]
    for r in rows:
        name = os.path.basename(os.path.normpath(r["code_path"]))[-28:]
        tau = r["patching"]["threshold"]
        shares = r["token_share_by_length"]
        lines.append(
            f"{name:<28} {str(r['image_size'] or '-'):>5} {r['grid'][0]:>3}x{r['grid'][1]:<3} "
            f"{r['tokens_per_image']:>5} {('-' if tau is None else f'{tau:.4f}'):>8} "
            f"{r['patches_per_image']:8.2f} {r['patches_per_image_std']:7.2f} {r['patches_per_image_p99']:7.1f} "
            f"{r.get('padded_patches_per_image', float('nan')):7.1f} {r['compression']:6.3f} "
            + " ".join(f"{shares.get(str(n), 0.0):6.3f}" for n in shown)
        )
    lines.append("M = patches per image (pad: batch maximum, averaged over batches); L=n: share of tokens in patches of n")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    try:
        threshold = args.threshold
        if args.target_compression is not None:
            entropy, _ = read_entropy_file(args.code_path[0])
            grid_width = store_grid_width(args.code_path[0], entropy.shape[-1])
            threshold, achieved = threshold_for_compression(
                sample_entropies(entropy, args.sample, args.seed), args.target_compression,
                args.max_patch_length, None if args.no_row_reset else grid_width, args.mode,
            )
            print(f"calibrated tau={threshold:.6f} on {args.code_path[0]} (compression {achieved:.4f})")
        config = PatchingConfig(args.mode, threshold, args.max_patch_length, not args.no_row_reset)
        rows = [store_statistics(p, config, args.sample, args.batch_size, args.seed) for p in args.code_path]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stores": rows}, f, indent=2)
        print(f"wrote {args.json}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Patch statistics of code stores' stored entropies.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--code-path", nargs="+", required=True, help="code store directories holding entropy.npy")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--threshold", type=float, default=None, help=f"tau (default {PAPER_THRESHOLD})")
    target.add_argument("--target-compression", type=float, default=None, help="calibrate tau on the first store")
    parser.add_argument("--mode", choices=PATCH_MODES, default="entropy", help="patch boundary rule")
    parser.add_argument("--max-patch-length", type=int, default=4, help="length cap; 0 = no cap")
    parser.add_argument("--no-row-reset", action="store_true", help="let patches run across grid rows")
    parser.add_argument("--sample", type=int, default=10000, help="random sequences per store; 0 = all")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size for the padded patch count")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample of (image, view) rows")
    parser.add_argument("--json", default=None, help="write the statistics here")
    args = parser.parse_args(argv)
    if args.max_patch_length < 0 or args.sample < 0 or args.batch_size < 1:
        parser.error("--max-patch-length and --sample must be >= 0, --batch-size >= 1")
    if args.mode not in GATED_MODES and args.target_compression is not None:
        parser.error(f"mode {args.mode!r} has a fixed compression; drop --target-compression")
    if args.mode in GATED_MODES and args.threshold is None and args.target_compression is None:
        args.threshold = PAPER_THRESHOLD
    args.max_patch_length = args.max_patch_length or None
    args.sample = args.sample or None
    return args


if __name__ == "__main__":
    main(parse_args())
