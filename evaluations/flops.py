"""Compute accounting for GPT and DPAR, counted from the modules a real forward pass calls.

Unit (the paper's): forward multiply-accumulates (MACs) of the linear layers per image. Every
nn.Linear application in one teacher-forced forward pass of one image adds
rows x in_features x out_features, where rows are the positions it is applied to:
  GPT   all block projections and the head over the T positions [class, x_0..x_{T-2}];
  DPAR  encoder token layers over T-1 tokens, patch layers over M slots [C, p_0..p_{M-2}],
        the encoder's cross-attention projections (queries and outputs per slot, keys/values
        per token), the decoder's patch projection once per slot, decoder token layers and
        the head over T slots.
One image per forward pass, so no padding enters a count (a batch of images with different
patch counts would pad the shorter ones).

Attention (not linear layers, not in the paper's unit): QK^T and AV each cost head_dim MACs
per (query, key) pair and head; causal self-attention over S positions has S(S+1)/2 pairs
(only the unmasked half is counted); the patch cross-attention scores each encoder token
against the query of its patch, one pair per token.

Training FLOPs per image = 3 (forward + backward) x 2 (FLOPs per MAC) x (linear + attention
MACs), the "6 x parameters x positions" estimate made exact for positions that differ by layer.

Fractional mean patch counts: every count depends on the patch layout only through the patch
count M (linear layers are affine in M, the patch layers' attention quadratic), so a mean
compression is counted at floor(M) and ceil(M) and interpolated linearly (exact for the paper's
unit), and a measured distribution is counted at every patch count it contains, weighted by
frequency (through the exact quadratic in M when it holds more than three counts). Boundaries
within a layout are placed evenly; where they lie changes no count.

    python -m evaluations.flops --model GPT-XL --image-size 384
    python -m evaluations.flops --model DPAR-XL --image-size 384 --compression 2.06
    python -m evaluations.flops --model DPAR-L --image-size 256 --entropy-path STORE --threshold 7.8
    python -m evaluations.flops --model GPT-B DPAR-B --image-size 128 256 384 512 --paper-compression

Several models or sizes print one markdown table. --paper-compression takes the paper's mean patch
length where it reports one (1.81 at 256 px, 2.06 at 384 px) and elsewhere an assumed one: the power
law patches = a x tokens^b through those two points (assumed_compression), marked "assumed".

Models are built on the meta device and materialised uninitialised (to_empty); during counting
each Linear returns zeros of its output shape instead of multiplying, so even XL counts in
seconds on a CPU.
"""
import argparse
import functools
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from autoregressive.models import all_models, build_model, model_family
from autoregressive.models.dpar import PatchCrossAttention
from autoregressive.models.modules import Attention
from entropy_model.calibrate import read_entropy_file, sample_entropies, store_grid_width
from entropy_model.patching import (
    PAPER_COMPRESSION, PAPER_SETTINGS, PATCH_MODES, PatchingConfig, paper_max_patch_length, paper_threshold)
from utils.cli import HelpFormatter

PAPER_FORWARD_GMACS = {("GPT-XL", 384, 1.0): 433.6, ("DPAR-XL", 384, 2.06): 258.5}  # (model, px, compression)


@dataclass
class MacCount:
    """MACs of one forward pass over a batch (divide by the batch size for per-image numbers)."""

    linear: float = 0.0  # linear layers (the paper's unit)
    attention: float = 0.0  # QK^T + AV, causal pairs only
    by_group: Dict[str, float] = field(default_factory=dict)  # linear MACs per top-level submodule

    def scaled(self, factor: float) -> "MacCount":
        groups = {k: v * factor for k, v in self.by_group.items()}
        return MacCount(self.linear * factor, self.attention * factor, groups)

    def __add__(self, other: "MacCount") -> "MacCount":
        groups = defaultdict(float, self.by_group)
        for k, v in other.by_group.items():
            groups[k] += v
        return MacCount(self.linear + other.linear, self.attention + other.attention, dict(groups))


def _zeros_for(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Stand-in for a Linear during counting: its output shape, no multiply."""
    return x.new_zeros(*x.shape[:-1], linear.out_features)


def _causal_pairs(lengths: torch.Tensor) -> int:
    """(query, key) pairs of causal attention over sequences of the given lengths."""
    lengths = lengths.long()
    return int((lengths * (lengths + 1) // 2).sum())


@torch.no_grad()
def count_forward_macs(model: nn.Module, *inputs, cheap: bool = True, **kw_inputs) -> MacCount:
    """Run model(*inputs, **kw_inputs) once and count the MACs of every nn.Linear application
    (rows x in_features x out_features) and of the attention (module docstring). cheap=True
    replaces each Linear's product by zeros of its output shape (the count needs shapes only);
    cheap=False runs the real layers."""
    names = {m: n for n, m in model.named_modules()}
    count = MacCount()
    groups: Dict[str, float] = defaultdict(float)

    def on_linear(module: nn.Linear, args):
        macs = args[0].numel() // module.in_features * module.in_features * module.out_features
        count.linear += macs
        groups[names[module].split(".")[0]] += macs

    def on_attention(module: Attention, args, kwargs):
        B, S, _ = args[0].shape  # (B, S, dim): causal over S, or over each packed document
        documents = args[2] if len(args) > 2 else kwargs.get("documents")
        pairs = B * S * (S + 1) // 2 if documents is None else _causal_pairs(documents.cu_seqlens.diff())
        count.attention += 2 * module.n_head * module.head_dim * pairs

    def on_cross_attention(module: PatchCrossAttention, args):
        tokens = args[1]  # (K, dim): every token meets the query of its segment, once
        count.attention += 2 * module.n_head * module.head_dim * tokens.shape[0]

    handles, stand_ins = [], []
    try:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_pre_hook(on_linear))
                if cheap:
                    module.forward = functools.partial(_zeros_for, module)
                    stand_ins.append(module)
            elif isinstance(module, Attention):
                handles.append(module.register_forward_pre_hook(on_attention, with_kwargs=True))
            elif isinstance(module, PatchCrossAttention):
                handles.append(module.register_forward_pre_hook(on_cross_attention))
        model(*inputs, **kw_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module in stand_ins:
            del module.forward  # back to nn.Linear.forward
    count.by_group = dict(groups)
    return count


# --------------------------------------------------------------------------------------
# Per-image accounting for registry models
# --------------------------------------------------------------------------------------
def meta_model(model_name: str, **kwargs) -> nn.Module:
    """Registry model built on the meta device, then given uninitialised CPU storage (no init
    cost; weights are never read by the cheap counter), in eval mode."""
    with torch.device("meta"):
        model = build_model(model_name, **kwargs)
    return model.to_empty(device="cpu").eval()


def even_lengths(num_tokens: int, num_patches: int) -> torch.Tensor:
    """(1, M) patch lengths covering num_tokens as evenly as possible."""
    if not 1 <= num_patches <= num_tokens:
        raise ValueError(f"patch count must be in 1..{num_tokens}, got {num_patches}")
    q, r = divmod(num_tokens, num_patches)
    lengths = [q] * (num_patches - r) + [q + 1] * r
    return torch.tensor([lengths], dtype=torch.long)


def _forward_count(model: nn.Module, lengths: Optional[torch.Tensor]) -> MacCount:
    """One image: idx (1, T-1), class 0, and for DPAR its (1, M) patch lengths."""
    T = model.config.block_size
    idx = torch.zeros(1, T - 1, dtype=torch.long)
    cond = torch.zeros(1, dtype=torch.long)
    if lengths is None:
        return count_forward_macs(model, idx, cond)
    return count_forward_macs(model, idx, cond, lengths)


def _lagrange(m: float, anchor: int, others: Sequence[int]) -> float:
    """Lagrange basis polynomial: 1 at `anchor`, 0 at `others`."""
    return math.prod((m - b) / (anchor - b) for b in others)


def _count_distribution(model: nn.Module, weights: Dict[int, float]) -> MacCount:
    """Frequency-weighted mean count over {patch count M: weight}. Every count is a polynomial
    of degree <= 2 in M, so up to three distinct counts are counted directly and more through
    the exact quadratic (Lagrange) through three anchor counts."""
    T, total = model.config.block_size, sum(weights.values())
    ms = sorted(weights)
    anchors = ms if len(ms) <= 3 else [ms[0], ms[len(ms) // 2], ms[-1]]
    out = MacCount()
    for k, a in enumerate(anchors):
        others = anchors[:k] + anchors[k + 1 :]
        coefficient = sum(w * _lagrange(m, a, others) for m, w in weights.items()) / total
        out = out + _forward_count(model, even_lengths(T, a)).scaled(coefficient)
    return out


def measured_patch_counts(
    entropy_path: str,
    threshold: Optional[float],
    max_patch_length: Optional[int],
    row_reset: bool = True,
    mode: str = "entropy",
    max_images: Optional[int] = None,
    seed: int = 0,
    num_tokens: Optional[int] = None,
    static_length: Optional[float] = None,
) -> np.ndarray:
    """Patches per image from stored entropies: entropy_path is the code store (or its
    entropy.npy, (N, views, T) float16); every view counts as an image; up to max_images
    random rows. Returns (rows,) int64 under the given patching rule. num_tokens, when given,
    must equal the stored T (the model's token count)."""
    path = str(Path(entropy_path).parent) if entropy_path.endswith(".npy") else entropy_path
    entropy, _ = read_entropy_file(path)
    if num_tokens is not None and entropy.shape[-1] != num_tokens:
        raise ValueError(f"{path} holds entropies of {entropy.shape[-1]} tokens per image, not {num_tokens}; "
                         f"check --image-size")
    width = store_grid_width(path, entropy.shape[-1])
    config = PatchingConfig(mode, threshold, max_patch_length, row_reset, static_length)
    rows = sample_entropies(entropy, max_images, seed)  # (S, T) float32
    return torch.cat([config.starts(chunk, width).sum(1) for chunk in rows.split(4096)]).numpy()


def flops_per_image(
    model_name: str,
    image_size: int,
    compression: Optional[float] = None,
    lengths: Union[None, Sequence[int], Sequence[Sequence[int]], torch.Tensor] = None,
    patch_counts: Union[None, Sequence[int], np.ndarray] = None,
    vocab_size: int = 16384,
    num_classes: int = 1000,
    downsample_size: int = 16,
    **model_kwargs,
) -> dict:
    """Per-image compute of a registry model at a resolution (grid = image_size / downsample_size).

    DPAR needs exactly one of: compression (mean tokens per patch, e.g. 2.06), lengths (one
    layout (M,) or several (B, M) zero-padded, averaged), patch_counts (patches per image of
    a measured distribution, see measured_patch_counts). Returns a plain dict: forward_macs
    (the paper's unit), forward_gmacs, attention_macs, training_flops,
    training_gflops, params, embedding_params, tokens, patches (mean M), compression,
    g_positions (positions the G / GPT layers run over), macs_by_group, method."""
    if model_name not in all_models():
        raise ValueError(f"unknown model {model_name!r}; choose one of {sorted(all_models())}")
    if image_size % downsample_size:
        raise ValueError(f"image size {image_size} is not a multiple of the downsample size {downsample_size}")
    grid = image_size // downsample_size
    T = grid * grid
    patched = model_family(model_name).patched
    given = [n for n, v in (("compression", compression), ("lengths", lengths), ("patch_counts", patch_counts))
             if v is not None]
    if not patched and given:
        raise ValueError(f"{given[0]} applies to DPAR models only; {model_name} runs every layer over all tokens")
    if patched and len(given) != 1:
        raise ValueError("a DPAR count needs exactly one of compression, lengths or patch_counts")
    model = meta_model(model_name, vocab_size=vocab_size, block_size=T, num_classes=num_classes, **model_kwargs)

    if not patched:
        macs, patches, method = _forward_count(model, None), float(T), "one forward pass"
    elif compression is not None:
        if not 1.0 <= compression <= T:
            raise ValueError(f"compression must be in [1, {T}] (tokens per patch), got {compression}")
        patches = T / compression
        lo, hi = math.floor(patches), math.ceil(patches)
        frac = patches - lo
        macs = _count_distribution(model, {lo: 1.0 - frac, hi: frac} if hi != lo else {lo: 1.0})
        method = f"forward passes at M = {lo} and {hi}, interpolated" if hi != lo else f"one forward pass at M = {lo}"
    elif lengths is not None:
        layouts = torch.as_tensor(lengths, dtype=torch.long)
        layouts = layouts[None] if layouts.ndim == 1 else layouts
        if layouts.ndim != 2 or bool((layouts.sum(1) != T).any()):
            raise ValueError(f"every patch layout must cover the {T} tokens of a {grid}x{grid} grid")
        counts = [_forward_count(model, row[row > 0][None]) for row in layouts]
        macs = sum(counts[1:], counts[0]).scaled(1.0 / len(counts))
        patches = float((layouts > 0).sum(1).float().mean())
        method = f"forward passes over {len(counts)} given layout(s), averaged"
    else:
        counts = np.asarray(patch_counts, dtype=np.int64).reshape(-1)
        if counts.size == 0 or counts.min() < 1 or counts.max() > T:
            raise ValueError(f"patch counts must lie in 1..{T}")
        histogram = Counter(counts.tolist())
        macs = _count_distribution(model, dict(histogram))
        patches = float(counts.mean())
        method = (f"{min(len(histogram), 3)} forward passes for the {len(histogram)} patch counts of "
                  f"{counts.size} images, weighted")

    params = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    training = 3 * 2 * (macs.linear + macs.attention)
    return {
        "model": model_name,
        "image_size": image_size,
        "grid": grid,
        "tokens": T,
        "patches": patches,
        "compression": T / patches,
        "g_positions": patches if patched else float(T),
        "params": params,
        "embedding_params": embedding,
        "forward_macs": macs.linear,
        "forward_gmacs": macs.linear / 1e9,
        "attention_macs": macs.attention,
        "training_flops": training,
        "training_gflops": training / 1e9,
        "macs_by_group": macs.by_group,
        "method": method,
    }


def paper_scaling_law(downsample_size: int = 16) -> tuple:
    """(a, b) of patches per image = a x tokens^b through the paper's two reported points (1.81
    tokens per patch at 256 px, 2.06 at 384 px; VQ tokens of downsample_size)."""
    (s0, c0), (s1, c1) = sorted(PAPER_COMPRESSION.items())
    t0, t1 = (s0 // downsample_size) ** 2, (s1 // downsample_size) ** 2
    b = math.log((t1 / c1) / (t0 / c0)) / math.log(t1 / t0)
    return (t0 / c0) / t0**b, b


def assumed_compression(image_size: int, downsample_size: int = 16) -> tuple:
    """(mean tokens per patch, source): the paper's where it reports one ("paper"), else the value
    on paper_scaling_law ("assumed": an extrapolation, not a measurement)."""
    if image_size in PAPER_COMPRESSION:
        return PAPER_COMPRESSION[image_size], "paper"
    a, b = paper_scaling_law(downsample_size)
    tokens = (image_size // downsample_size) ** 2
    return max(1.0, tokens / (a * tokens**b)), "assumed"


def resolution_table(models: Sequence[str], sizes: Sequence[int], compressions: Optional[Sequence[float]] = None,
                     **kwargs) -> list:
    """flops_per_image of every model at every size, each result with "compression_source". DPAR
    models count at `compressions` (one per size, "given"), or without them at assumed_compression."""
    if compressions is not None and len(compressions) != len(sizes):
        raise ValueError(f"give one compression per image size ({len(sizes)}), got {len(compressions)}")
    downsample = kwargs.get("downsample_size", 16)
    results = []
    for k, size in enumerate(sizes):
        for name in models:
            if not model_family(name).patched:
                results.append({**flops_per_image(name, size, **kwargs), "compression_source": None})
                continue
            compression, source = ((compressions[k], "given") if compressions is not None
                                   else assumed_compression(size, downsample))
            results.append({**flops_per_image(name, size, compression=compression, **kwargs),
                            "compression_source": source})
    return results


def format_resolution_table(results: Sequence[dict]) -> str:
    """Markdown table of resolution_table results; "vs <model>" compares with the first model at
    the same size."""
    first = {}
    for r in results:
        first.setdefault(r["image_size"], r)
    base = results[0]["model"]
    lines = [f"| model | image size | tokens | tokens/patch | positions in G | forward GMACs | training GFLOPs "
             f"| forward vs {base} | training vs {base} |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        source = f" ({r['compression_source']})" if r.get("compression_source") else ""
        ref = first[r["image_size"]]
        lines.append(f"| {r['model']} | {r['image_size']} px | {r['tokens']} | {r['compression']:.3f}{source} | "
                     f"{r['g_positions']:.1f} | {r['forward_gmacs']:.2f} | {r['training_gflops']:.1f} | "
                     f"{r['forward_macs'] / ref['forward_macs']:.3f} | "
                     f"{r['training_flops'] / ref['training_flops']:.3f} |")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """Two-column text table of a flops_per_image result."""
    grid, params, embedding = result["grid"], result["params"] / 1e6, result["embedding_params"] / 1e6
    rows = [
        ("model", result["model"]),
        ("image size / token grid", f"{result['image_size']} px / {grid}x{grid} = {result['tokens']} tokens"),
        ("params (non-embedding)", f"{params:.1f} M ({params - embedding:.1f} M)"),
        ("positions in the G layers", f"{result['g_positions']:.2f}"),
        ("compression (tokens/patch)", f"{result['compression']:.3f}"),
        ("forward GMACs/image", f"{result['forward_gmacs']:.1f}"),
    ]
    paper = PAPER_FORWARD_GMACS.get((result["model"], result["image_size"], round(result["compression"], 2)))
    if paper is not None:
        rows.append(("  the paper reports", f"{paper} ({100 * (result['forward_gmacs'] / paper - 1):+.2f}%)"))
    rows += [(f"  {group}", f"{macs / 1e9:.2f}") for group, macs in result["macs_by_group"].items()]
    rows += [
        ("attention GMACs/image (causal)", f"{result['attention_macs'] / 1e9:.2f}"),
        ("training GFLOPs/image", f"{result['training_gflops']:.1f}"),
        ("counted by", result["method"]),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _lengths(text: str) -> list:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated patch lengths, got {text!r}") from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Forward MACs (the paper's unit) and training FLOPs per image, "
                                            "counted from the modules of one forward pass.",
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, nargs="+", choices=sorted(all_models()),
                   help="registry name(s); several print one table")
    p.add_argument("--image-size", type=int, nargs="+", default=[256], help="image size(s) in pixels")
    p.add_argument("--downsample-size", type=int, default=16, help="tokenizer downsampling (VQ-16: 16)")
    p.add_argument("--vocab-size", type=int, default=16384, help="codebook size")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the class embedding")
    g = p.add_argument_group("DPAR patches (exactly one)")
    g.add_argument("--compression", type=float, nargs="+", default=None,
                   help="mean tokens per patch, one per image size (the paper's: 1.81 at 256 px, 2.06 at 384 px)")
    g.add_argument("--paper-compression", action="store_true",
                   help="the paper's compression where it reports one, elsewhere the assumed power law through "
                        "its two points (marked 'assumed')")
    g.add_argument("--lengths", type=_lengths, default=None, help="one patch layout, comma-separated lengths")
    g.add_argument("--entropy-path", default=None, help="code store holding entropy.npy: use its measured patch counts")
    g = p.add_argument_group("patching rule for --entropy-path")
    g.add_argument("--patching-mode", choices=PATCH_MODES, default="entropy", help="patch boundary rule")
    g.add_argument("--threshold", type=float, default=None,
                   help="entropy threshold tau (default the paper's at --image-size: "
                        + ", ".join(f"{s.threshold} at {size} px" for size, s in PAPER_SETTINGS.items()) + ")")
    g.add_argument("--static-length", type=float, default=None,
                   help="mode static: mean length of the uniform pattern (fractional allowed)")
    g.add_argument("--max-patch-length", type=int, default=None,
                   help="length cap (0 = none; default the paper's at --image-size: "
                        + ", ".join(f"{s.max_patch_length} at {size} px" for size, s in PAPER_SETTINGS.items()) + ")")
    g.add_argument("--no-row-reset", action="store_true", help="let patches run across grid rows")
    g.add_argument("--max-images", type=int, default=10000, help="random entropy rows used (0 = all)")
    p.add_argument("--json", default=None, help="also write the result (a list for a table) to this JSON file")
    args = p.parse_args(argv)
    sources = [n for n in ("compression", "paper_compression", "lengths", "entropy_path") if getattr(args, n)]
    if len(sources) > 1:
        p.error(f"--{sources[0].replace('_', '-')} and --{sources[1].replace('_', '-')}: give one patch source")
    several = len(args.model) > 1 or len(args.image_size) > 1
    if several and (args.lengths is not None or args.entropy_path is not None):
        p.error("--lengths and --entropy-path count one model at one image size")
    if args.compression is not None and len(args.compression) not in (1, len(args.image_size)):
        p.error(f"--compression: give one value, or one per image size ({len(args.image_size)})")
    if args.max_patch_length is not None and args.max_patch_length < 0:
        p.error("--max-patch-length must be >= 0 (0 = no cap)")
    return args


FLOPS_REMEDY = "pass --threshold and --max-patch-length"


def entropy_patch_counts(args: argparse.Namespace, image_size: int) -> np.ndarray:
    """Measured patches per image under the flags' rule; tau and P_max default to the paper's at
    image_size, and a size without a published setting refuses in one line."""
    gated = args.patching_mode in ("entropy", "relative")
    threshold = args.threshold
    if gated and threshold is None:
        threshold = paper_threshold(image_size) if image_size in PAPER_SETTINGS else None
    cap = args.max_patch_length
    if cap is None and args.patching_mode != "token" and args.static_length is None:
        if image_size not in PAPER_SETTINGS:
            raise ValueError(f"the paper publishes no patching setting for {image_size} px images: {FLOPS_REMEDY}")
        cap = paper_max_patch_length(image_size)
    if gated and threshold is None:
        raise ValueError(f"the paper publishes no patching setting for {image_size} px images: {FLOPS_REMEDY}")
    tokens = (image_size // args.downsample_size) ** 2
    return measured_patch_counts(args.entropy_path, threshold, cap or None, not args.no_row_reset,
                                 args.patching_mode, args.max_images or None, num_tokens=tokens,
                                 static_length=args.static_length)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    common = dict(vocab_size=args.vocab_size, num_classes=args.num_classes, downsample_size=args.downsample_size)
    try:
        if len(args.model) > 1 or len(args.image_size) > 1 or args.paper_compression:
            compressions = args.compression
            if compressions is not None and len(compressions) == 1:
                compressions = compressions * len(args.image_size)
            dpar = [m for m in args.model if model_family(m).patched]
            if dpar and compressions is None and not args.paper_compression:
                raise ValueError(f"{dpar[0]} needs --compression (one per image size) or --paper-compression")
            result = resolution_table(args.model, args.image_size, compressions, **common)
            print(format_resolution_table(result))
        else:
            size = args.image_size[0]
            patch_counts = entropy_patch_counts(args, size) if args.entropy_path is not None else None
            compression = args.compression[0] if args.compression is not None else None
            result = flops_per_image(args.model[0], size, compression=compression, lengths=args.lengths,
                                     patch_counts=patch_counts, **common)
            print(format_table(result))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
