"""Decode cost model of DPAR against the LlamaGen GPT, and a CPU measurement to hold it against.

    python -m benchmarks.decode_cost model --json docs/benchmarks/decode_cost_model.json
    python -m benchmarks.decode_cost measure --json docs/benchmarks/cpu_decode_b32.json

model: for every sampling step, the weight bytes, KV-cache bytes and FLOPs of each kernel group
(a layer's matmuls, a layer's cached attention, the head) of the GPT and of DPAR (entropy model,
encoder, patch step, decoder), from patch layouts with an ImageNet-like spread (see `layouts`).
A kernel takes max(bytes / bandwidth, FLOPs / peak) (a roofline per kernel, summed over the step;
launch overheads are not modelled: the GPU path runs captured CUDA graphs). Predicted throughput
ratio = GPT time / DPAR time over a whole image. Rows of the table:
  masked  the patch step runs every row and reads every row's patch cache up to the batch's
          highest slot (the step before per-row reads);
  rows    the patch layers' matmuls run every row, but attention reads each opening row's own
          patch cache up to its own slot and the other rows read nothing; token-level caches
          read each row's own length (per-row reads alone);
  group   as rows, and the patch step (pooling, patch layers, injections) runs only a group of
          images: the opening ones, padded to a power of two (patch_group). What generate_dpar
          runs (DPAR.close_patches; flex decode attention).
Cached reads are counted in blocks of DECODE_BLOCK slots (the flex block mask's granularity);
the masked step's patch reads use read_length. Devices: H100 SXM (3.35 TB/s, 989 TFLOP/s bf16
dense) and H200 (4.8 TB/s, 989 TFLOP/s), from NVIDIA's spec sheets, bf16 weights and caches,
batch 256 with guidance (512 rows); and this CPU, float32, at the measurement's batch, its two
rates measured here: the matmul rate at a decode matmul's shape and the read rate of the decode
attention kernel (flex, compiled) over a cache of the measurement's shape.

measure: GPT-B and DPAR-B (random weights, vocabulary 16384, 384 px = 576 tokens) sample the same
classes, alternating in one process, eager steps with flex decode attention (both models), batch
--batch with guidance (twice the rows). DPAR's entropy model (GPT-S by default) runs every step,
but its entropies are replaced by the synthetic layouts' (`ScriptedEntropy`): an untrained
entropy model cannot give an ImageNet-like spread of patch layouts. Also DPAR at a higher tau and
a larger P_max at inference (Result 5: larger patches), on the same classes and layouts.
The cost model's CPU prediction for the same batch and layouts is printed beside it.
"""
import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from autoregressive.models.attention import DECODE_BLOCK, set_decode_attention
from autoregressive.models.dpar import DPAR_models
from autoregressive.models.generate import Decoding, generate, patch_group
from autoregressive.models.gpt import GPT_models
from autoregressive.models.modules import find_multiple, read_length
from benchmarks.benchmark import synthetic_entropies
from benchmarks.cache_reads import best_seconds
from entropy_model.calibrate import threshold_for_compression
from entropy_model.patching import PAPER_COMPRESSION, PatchingConfig, paper_max_patch_length, paper_threshold

GPUS = {  # name: (bytes/s, FLOP/s bf16 dense), vendor spec sheets
    "H100 SXM": (3.35e12, 989e12),
    "H200": (4.8e12, 989e12),
}
VOCAB = 16384
SIZES = ("B", "L", "XL")
ENTROPY_MODELS = ("GPT-S", "GPT-B")
PATHS = ("masked", "rows", "group")


# --------------------------------------------------------------------------------------
# Patch layouts
# --------------------------------------------------------------------------------------
def layout_entropies(images: int, grid: int, seed: int = 0) -> torch.Tensor:
    """(images, grid*grid) entropies in nats with an ImageNet-like spread: benchmark.py's synthetic
    scores (spatially smooth, a per-image offset), shifted so that the paper's tau gives the paper's
    mean compression with P_max 4 and row reset, then rounded to ln k (k a whole number of equally
    likely codes, what ScriptedEntropy's logits give)."""
    g = torch.Generator().manual_seed(seed)
    scores = synthetic_entropies(images, grid, g)
    size = grid * 16
    tau, _ = threshold_for_compression(scores, PAPER_COMPRESSION[size], paper_max_patch_length(size), grid)
    nats = (scores - tau + paper_threshold(size)).clamp(0.0, math.log(VOCAB))
    return torch.log(torch.exp(nats).round().clamp(1, VOCAB))


def paper_patching(size: int, tau_shift: float = 0.0, max_length: Optional[int] = None) -> PatchingConfig:
    return PatchingConfig("entropy", paper_threshold(size) + tau_shift, max_length or paper_max_patch_length(size),
                          True)


def starts_of(entropy: torch.Tensor, patching: PatchingConfig, grid: int) -> torch.Tensor:
    return patching.starts(entropy, grid)  # (images, T) bool


# --------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------
@dataclass
class Width:
    dim: int
    hidden: int

    @classmethod
    def of(cls, config) -> "Width":
        hidden = find_multiple(int(2 * (4 * config.dim) / 3), config.multiple_of)
        return cls(config.dim, hidden)

    @property
    def block_params(self) -> int:  # wqkv + wo + SwiGLU
        return 4 * self.dim * self.dim + 3 * self.dim * self.hidden


def meta_config(registry, name: str, **kwargs):
    with torch.device("meta"):
        return registry[name](**kwargs).config


class Kernels:
    """Sum of per-kernel rooflines: time = sum max(bytes / bandwidth, flops / peak)."""

    def __init__(self, bandwidth: float, peak: float, weight_bytes: int, kv_bytes: int):
        self.bandwidth, self.peak, self.wb, self.kb = bandwidth, peak, weight_bytes, kv_bytes
        self.seconds = 0.0
        self.totals = {"weight_bytes": 0.0, "kv_bytes": 0.0, "flops": 0.0}

    def add(self, weight_elems: float, kv_elems: float, flops: float) -> None:
        wb, kb = weight_elems * self.wb, kv_elems * self.kb
        self.totals["weight_bytes"] += wb
        self.totals["kv_bytes"] += kb
        self.totals["flops"] += flops
        self.seconds += max((wb + kb) / self.bandwidth, flops / self.peak)

    def matmul(self, params: int, rows: int) -> None:
        self.add(params, 0, 2.0 * params * rows)

    def attention(self, slots: float, dim: int) -> None:
        """slots: cache slots read, summed over rows (keys and values of `dim` channels each)."""
        self.add(0, 2 * slots * dim, 4.0 * slots * dim)


def blocks(slots: torch.Tensor) -> torch.Tensor:
    return -(-slots // DECODE_BLOCK) * DECODE_BLOCK


def gpt_cost(k: Kernels, config, rows: int, T: int) -> None:
    w = Width.of(config)
    for i in range(T):  # step i reads slots 0..i (class slot + i tokens)
        slots = float(blocks(torch.tensor(i + 1))) * rows
        for _ in range(config.n_layer):
            k.matmul(w.block_params, rows)
            k.attention(slots, w.dim)
        k.matmul(config.vocab_size * w.dim, rows)


def dpar_cost(k: Kernels, config, entropy_config, starts: torch.Tensor, copies: int, path: str) -> None:
    """starts (images, T) bool: the patch layouts; path "rows" or "masked" (module docstring)."""
    images, T = starts.shape
    rows = images * copies
    w, we = Width.of(config), Width.of(entropy_config)
    E, G, D = config.n_encoder_layer, config.n_patch_layer, config.n_decoder_layer
    slot = starts.long().cumsum(1)  # (images, T): patches opened up to and including token i
    for i in range(T):
        if i > 0:
            e_slots = float(blocks(torch.tensor(i + 1))) * images  # entropy model: start slot + i tokens
            for _ in range(entropy_config.n_layer):
                k.matmul(we.block_params, images)
                k.attention(e_slots, we.dim)
            k.matmul(entropy_config.vocab_size * we.dim, images)
            enc_slots = float(blocks(torch.tensor(i))) * images  # encoder: x_0..x_{i-1}
            for _ in range(E):
                k.matmul(w.block_params, images)
                k.attention(enc_slots, w.dim)
            opens = starts[:, i]
            if bool(opens.any()):
                pooled = patch_group(int(opens.sum()), images) if path == "group" else images
                k.matmul(4 * w.dim * w.dim * E, pooled)  # pooling cross-attention
                own = slot[:, i - 1]  # (images,) slot of each opening row's new patch
                patch_rows = rows
                if path == "masked":
                    patch_slots = float(read_length(int(own.max()) + 1, T + 1, 32)) * rows
                else:
                    patch_slots = float(blocks(own[opens] + 1).sum()) * copies
                if path == "group":
                    patch_rows = copies * patch_group(int(opens.sum()), images)
                for _ in range(G):
                    k.matmul(w.block_params, patch_rows)
                    k.attention(patch_slots, w.dim)
                k.matmul(D * w.dim * w.dim, patch_rows)  # injections
        dec_slots = float(blocks(torch.tensor(i + 1))) * rows
        for _ in range(D):
            k.matmul(w.block_params, rows)
            k.attention(dec_slots, w.dim)
        k.matmul(config.vocab_size * w.dim, rows)


def predict(size: str, entropy_name: str, image_size: int, starts: torch.Tensor, copies: int, bandwidth: float,
            peak: float, elem_bytes: int) -> dict:
    T = (image_size // 16) ** 2
    gpt_config = meta_config(GPT_models, f"GPT-{size}", vocab_size=VOCAB, block_size=T)
    dpar_config = meta_config(DPAR_models, f"DPAR-{size}", vocab_size=VOCAB, block_size=T)
    ent_config = meta_config(GPT_models, entropy_name, vocab_size=VOCAB, block_size=T, model_type="uncond")
    rows = starts.shape[0] * copies
    out = {}
    g = Kernels(bandwidth, peak, elem_bytes, elem_bytes)
    gpt_cost(g, gpt_config, rows, T)
    out["gpt_seconds"] = g.seconds
    out["gpt_per_step"] = {name: v / T for name, v in g.totals.items()}
    for path in PATHS:
        d = Kernels(bandwidth, peak, elem_bytes, elem_bytes)
        dpar_cost(d, dpar_config, ent_config, starts, copies, path)
        out[f"dpar_{path}_seconds"] = d.seconds
        out[f"dpar_{path}_per_step"] = {name: v / T for name, v in d.totals.items()}
        out[f"ratio_{path}"] = g.seconds / d.seconds
    return out


def layout_stats(starts: torch.Tensor) -> dict:
    counts = starts.sum(1).float()
    return {"images": starts.shape[0], "patches_min": int(counts.min()), "patches_max": int(counts.max()),
            "patches_mean": float(counts.mean()), "tokens_per_patch": starts.shape[1] / float(counts.mean())}


def patch_step_shapes(starts: torch.Tensor, read_block: int = 32) -> dict:
    """The (group size, read length) pairs generate_dpar passes to the patch step over these
    layouts (images, T): the patch step's distinct shapes, one CUDA graph each."""
    images, T = starts.shape
    slot = starts.long().cumsum(1)
    pairs = set()
    for i in range(1, T):
        opens = starts[:, i]
        if bool(opens.any()):
            top = int((slot[:, i - 1] * opens).max())
            pairs.add((patch_group(int(opens.sum()), images), read_length(top + 1, T, read_block)))
    return {"shapes": len(pairs), "group_sizes": sorted({g for g, _ in pairs}),
            "read_lengths": sorted({n for _, n in pairs})}


def model_tables(args) -> dict:
    result = {"devices": {name: {"bytes_per_s": bw, "flops_per_s": pk} for name, (bw, pk) in GPUS.items()},
              "batch": args.gpu_batch, "rows": 2 * args.gpu_batch, "dtype": "bfloat16", "decode_block": DECODE_BLOCK,
              "layouts": {}, "rows_": []}
    for image_size in args.image_sizes:
        grid = image_size // 16
        starts = starts_of(layout_entropies(args.gpu_batch, grid, args.seed), paper_patching(image_size), grid)
        result["layouts"][str(image_size)] = {**layout_stats(starts), "patch_step": patch_step_shapes(starts)}
        for device, (bw, pk) in GPUS.items():
            for size in args.sizes:
                for ent in args.entropy_models:
                    p = predict(size, ent, image_size, starts, 2, bw, pk, 2)
                    result["rows_"].append({"device": device, "model": size, "image_size": image_size,
                                            "entropy_model": ent, **p})
    result["predictions"] = result.pop("rows_")
    return result


def print_model_table(result: dict) -> None:
    for size, stats in result["layouts"].items():
        shapes = stats["patch_step"]
        print(f"{size} px layouts: {stats['images']} images, {stats['patches_min']}-{stats['patches_max']} patches "
              f"(mean {stats['patches_mean']:.0f}, {stats['tokens_per_patch']:.2f} tokens per patch); patch step "
              f"{shapes['shapes']} shapes (groups {shapes['group_sizes']}, read lengths {shapes['read_lengths']})")
    print(f"{'device':9s} {'model':5s} {'px':>4s} {'entropy':7s} {'GPT ms/img':>10s} {'masked':>7s} {'rows':>7s} "
          f"{'group':>7s}")
    for r in result["predictions"]:
        per_image = r["gpt_seconds"] / result["batch"] * 1e3
        print(f"{r['device']:9s} {r['model']:5s} {r['image_size']:4d} {r['entropy_model']:7s} {per_image:10.3f} "
              f"{r['ratio_masked']:6.2f}x {r['ratio_rows']:6.2f}x {r['ratio_group']:6.2f}x")


def markdown(model: dict, measured: Optional[dict], larger: Optional[dict] = None) -> str:
    """docs/performance.md's tables from the records: the cost model, the GPT/DPAR measurement and
    (optionally) a --compare larger measurement."""
    lines = ["| device | model | px | entropy model | GPT ms/image | masked | rows | group |",
             "|---|---|---|---|---|---|---|---|"]
    for r in model["predictions"]:
        lines.append(f"| {r['device']} | {r['model']} | {r['image_size']} | {r['entropy_model']} | "
                     f"{r['gpt_seconds'] / model['batch'] * 1e3:.2f} | {r['ratio_masked']:.2f}x | "
                     f"{r['ratio_rows']:.2f}x | {r['ratio_group']:.2f}x |")
    if measured:
        m, p = measured, measured["prediction"]
        lines += ["", "| setting | GPT s | DPAR s | DPAR/GPT measured | cost model |", "|---|---|---|---|---|"]
        for g, d, ratio in zip(m["seconds"]["gpt"], m["seconds"]["dpar"], m["ratio_runs"]):
            predicted = f"{p['ratio_group']:.2f}x" if p else "-"
            lines.append(f"| {m['models'][0]} vs {m['models'][1]} ({m['models'][2]} entropy model), batch {m['batch']} "
                         f"with guidance, {m['tokens']} tokens | {g:.1f} | {d:.1f} | {ratio:.2f}x | {predicted} |")
    for record in (r for r in (measured, larger) if r and r["larger_patches"]):
        size = record["image_size"]
        paper = f"tau {paper_threshold(size)}, P_max {paper_max_patch_length(size)}"
        lines += ["", "| inference setting | DPAR s (runs) | patches per image | speed vs the paper setting "
                  "(runs) | cost model |", "|---|---|---|---|---|"]

        def patches(name: str) -> str:
            low, high, mean = record["patches"][name]
            return f"{low}-{high}, mean {mean:.0f}"

        def seconds(name: str) -> str:
            return ", ".join(f"{t:.1f}" for t in record["seconds"][name])

        lines.append(f"| paper ({paper}) | {seconds('dpar')} | {patches('dpar')} | 1.00x | 1.00x |")
        for name in record["larger_patches"]:
            runs = ", ".join(f"{r:.2f}x" for r in record.get("larger_patches_runs", {}).get(name, []))
            predicted = record.get("larger_patches_predicted", {}).get(name)
            lines.append(f"| {name} | {seconds(name)} | {patches(name)} | {record['larger_patches'][name]:.2f}x "
                         f"({runs}) | {f'{predicted:.2f}x' if predicted else '-'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# CPU rates and measurement
# --------------------------------------------------------------------------------------
@torch.no_grad()
def cpu_rates(rows: int, dim: int, heads: int, slots: int) -> Dict[str, float]:
    """This CPU's matmul rate at a decode matmul's shape (rows x dim @ dim x 3 dim, float32) and
    the read rate of flex decode attention over a (rows, slots) cache, every row reading all."""
    from autoregressive.models.attention import cached_attend

    x, w = torch.randn(rows, dim), torch.randn(dim, 3 * dim)
    matmul = 2.0 * rows * dim * 3 * dim / best_seconds(lambda: x @ w)
    head_dim = dim // heads
    q = torch.randn(rows, heads, 1, head_dim)
    cache = torch.randn(2, rows, slots + 1, heads, head_dim)
    k, v = (c[:, :slots].transpose(1, 2) for c in cache)  # (rows, H, L, D) strided views, as in decoding
    pos = torch.full((rows, 1), slots - 1)
    read = 2.0 * rows * slots * dim * 4 / best_seconds(lambda: cached_attend(q, k, v, pos))
    return {"matmul_flops_per_s": matmul, "attention_bytes_per_s": read}


class ScriptedEntropy(nn.Module):
    """An entropy model whose cost is the wrapped GPT's (every step runs it) but whose entropies
    are given: `entropies` (images, T) in nats, each ln k for a whole k, returned as logits with k
    equal entries (the rest -1e4). Has the methods IncrementalEntropy calls."""

    def __init__(self, model: nn.Module, entropies: torch.Tensor):
        super().__init__()
        self.model = model
        self.config = model.config
        self.register_buffer("codes", torch.exp(entropies).round().long(), persistent=False)  # (images, T) k

    def _logits(self, like: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        k = self.codes.gather(1, slot)  # (images, 1)
        return torch.where(torch.arange(like.shape[-1]) < k, 0.0, -1e4) + 0.0 * like

    def setup_caches(self, *args):
        self.model.setup_caches(*args)

    def remove_caches(self):
        self.model.remove_caches()

    def step_position(self, *args):
        return self.model.step_position(*args)

    def prefill(self, cond_idx, batch: int):
        logits = self.model.prefill(cond_idx, batch=batch)
        return self._logits(logits, torch.zeros(batch, 1, dtype=torch.long))

    def decode(self, tokens, input_pos, length):
        logits = self.model.decode(tokens, input_pos, length)
        return self._logits(logits, input_pos - self.config.cls_token_num + 1)


def random_models(size: str, entropy_name: str, T: int):
    torch.manual_seed(0)
    gpt = GPT_models[f"GPT-{size}"](vocab_size=VOCAB, block_size=T).eval()
    dpar = DPAR_models[f"DPAR-{size}"](vocab_size=VOCAB, block_size=T).eval()
    ent = GPT_models[entropy_name](vocab_size=VOCAB, block_size=T, model_type="uncond").eval()
    for m in (gpt, dpar):  # LlamaGen zero-initialises the heads: give the sampler real distributions
        nn.init.normal_(m.output.weight, std=0.02)
    return gpt, dpar, ent


def measure(args) -> dict:
    size, T = args.image_size, (args.image_size // 16) ** 2
    grid, tokens = args.image_size // 16, args.tokens or T
    set_decode_attention("flex")
    gpt, dpar, ent = random_models(args.model, args.entropy_model, T)
    entropies = layout_entropies(args.batch, grid, args.seed)
    scripted = ScriptedEntropy(ent, entropies)
    runs = {"gpt": None, "dpar": paper_patching(size)}
    if args.larger_tau:
        suffix = f"_pmax{args.max_length}" if args.max_length else ""
        runs[f"dpar_tau+{args.larger_tau}{suffix}"] = paper_patching(size, args.larger_tau, args.max_length or None)
    if args.larger_max_length:
        runs[f"dpar_pmax{args.larger_max_length}"] = paper_patching(size, 0.0, args.larger_max_length)
    cond = torch.arange(args.batch) % 1000
    seeds = list(range(args.batch))
    decoding = Decoding(read_block=32, keep_caches=True)
    times: Dict[str, List[float]] = {name: [] for name in runs}
    patches = {}

    def run(name: str) -> float:
        kwargs = {} if runs[name] is None else {"entropy_model": scripted, "patching": runs[name]}
        model = gpt if runs[name] is None else dpar
        start = time.perf_counter()
        out = generate(model, cond, tokens, cfg_scale=4.0, row_seeds=seeds, decoding=decoding, **kwargs)
        seconds = time.perf_counter() - start
        if out.num_patches is not None:
            patches[name] = [int(out.num_patches.min()), int(out.num_patches.max()), float(out.num_patches.float().mean())]
        return seconds

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; warm-up "
          f"(flex compiles once per read shape)", flush=True)
    larger = [n for n in runs if n not in ("gpt", "dpar")]
    if args.compare == "larger":  # DPAR at the paper setting against larger patches, alternating
        runs.pop("gpt")
        times.pop("gpt")
    for name in ("gpt", "dpar") if args.compare == "gpt" else ("dpar",):  # warm-up: compiles every read shape
        run(name)
    for r in range(args.repeats):  # GPT and DPAR alternate; the larger-patch runs once, beside them
        order = ["gpt", "dpar"] + (larger if r == 0 else []) if args.compare == "gpt" else ["dpar"] + larger
        for name in order:
            times[name].append(run(name))
            print(f"repeat {r}: {name} {times[name][-1]:.1f} s", flush=True)
    # side by side: each DPAR time against the GPT time before it
    ratios = [g / d for g, d in zip(times.get("gpt", []), times["dpar"])]
    starts = starts_of(entropies, paper_patching(size), grid)[:, :tokens]
    rates = cpu_rates(2 * args.batch, gpt.config.dim, gpt.config.n_head, T // 2)
    bw, pk = rates["attention_bytes_per_s"], rates["matmul_flops_per_s"]
    prediction = predict(args.model, args.entropy_model, size, starts, 2, bw, pk, 4) if tokens == T else None
    larger_predicted = {}
    if prediction:
        for name in larger:
            other = predict(args.model, args.entropy_model, size, starts_of(entropies, runs[name], grid), 2, bw, pk, 4)
            larger_predicted[name] = prediction["dpar_group_seconds"] / other["dpar_group_seconds"]
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores "
        f"(shared), load {os.getloadavg()[0]:.1f}", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "models": [f"GPT-{args.model}", f"DPAR-{args.model}", args.entropy_model], "image_size": size,
        "tokens": tokens, "batch": args.batch, "rows": 2 * args.batch, "cfg_scale": 4.0,
        "decode_attention": "flex", "seconds": times, "patches": patches, "layouts": layout_stats(starts),
        "ratio_runs": ratios, "ratio_median": statistics.median(ratios) if ratios else None,
        "ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "larger_patches": {name: statistics.median(times["dpar"]) / statistics.median(times[name])
                           for name in larger},
        "larger_patches_runs": {name: [d / t for d, t in zip(times["dpar"], times[name])] for name in larger},
        "cpu_rates": rates, "prediction": prediction, "larger_patches_predicted": larger_predicted,
    }
    if ratios:
        print(f"DPAR-{args.model}/GPT-{args.model} sampling throughput: median {result['ratio_median']:.2f}x "
              f"(runs {', '.join(f'{r:.2f}' for r in ratios)})")
    if prediction:
        print(f"cost model on this CPU: {prediction['ratio_group']:.2f}x (per-row reads alone "
              f"{prediction['ratio_rows']:.2f}x, masked patch step {prediction['ratio_masked']:.2f}x)")
    for name, speed in result["larger_patches"].items():
        print(f"{name}: {speed:.2f}x the paper setting's DPAR speed; patches {patches[name]}")
    return result


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=["model", "measure", "markdown"])
    p.add_argument("--json", help="write the result here (markdown: the model record to read)")
    p.add_argument("--measured-json", help="markdown: the measurement record to read")
    p.add_argument("--larger-json", help="markdown: a --compare larger measurement record to read")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic layouts")
    p.add_argument("--gpu-batch", type=int, default=256, help="model: images per batch (rows: twice this)")
    p.add_argument("--image-sizes", type=int, nargs="+", default=[256, 384], choices=[256, 384])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    p.add_argument("--entropy-models", nargs="+", default=list(ENTROPY_MODELS), choices=ENTROPY_MODELS)
    p.add_argument("--model", default="B", choices=SIZES, help="measure: GPT-X against DPAR-X")
    p.add_argument("--entropy-model", default="GPT-S", choices=ENTROPY_MODELS)
    p.add_argument("--image-size", type=int, default=384, choices=[256, 384])
    p.add_argument("--batch", type=int, default=32, help="measure: images (rows: twice this, with guidance)")
    p.add_argument("--tokens", type=int, default=0, help="measure: tokens per image (0 = all; fewer skips the "
                   "prediction)")
    p.add_argument("--repeats", type=int, default=2, help="measure: GPT/DPAR pairs after the warm-up pair")
    p.add_argument("--compare", default="gpt", choices=["gpt", "larger"],
                   help="measure: GPT against DPAR (larger-patch runs once), or DPAR against its larger-patch runs "
                        "alternating (no GPT)")
    p.add_argument("--max-length", type=int, default=0, help="measure: P_max of the larger-tau run (0: the paper's)")
    p.add_argument("--larger-max-length", type=int, default=6, help="measure: P_max of a larger-patch run (0: none)")
    p.add_argument("--larger-tau", type=float, default=0.5, help="measure: tau + this in a larger-patch run (0: none)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.section == "markdown":
        with open(args.json) as f:
            model = json.load(f)
        measured, larger = None, None
        if args.measured_json:
            with open(args.measured_json) as f:
                measured = json.load(f)
        if args.larger_json:
            with open(args.larger_json) as f:
                larger = json.load(f)
        print(markdown(model, measured, larger))
        return model
    if args.section == "model":
        result = model_tables(args)
        print_model_table(result)
    else:
        result = measure(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
