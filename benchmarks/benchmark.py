"""Training and sampling speed of DPAR against the LlamaGen GPT, beside the FLOPs ratio.

    python -m benchmarks.benchmark --json OUT.json     # default comparison on this device
    python -m benchmarks.benchmark --gpt-model GPT-L --dpar-model DPAR-L --image-size 384 --batch-size 32

One run measures both models with their steps alternating (GPT, DPAR, GPT, ...), so load
changes on a shared machine hit both; after warm-up steps the medians are reported, and the
speed-up is the median of the per-pair ratios. On a CPU shared with other jobs, run with
OMP_WAIT_POLICY=PASSIVE or --threads 1: OpenMP threads that spin while their core runs another
job slow every small kernel several-fold (DPAR, with more and smaller kernels, more so). The
device string records the load average at the start.

Patches: --compression (mean tokens per patch, default the paper's 1.81 at 256 px and 2.06 at
384 px) synthesises batches with the paper's rule (row reset, length cap 4) on spatially
correlated synthetic entropies with a per-image offset (so images differ in patch count, as
real ones do), the threshold calibrated per batch to that mean; --entropy-path uses a code
store's stored entropies and --threshold instead. The FLOPs ratio comes from
evaluations.flops over exactly the patch counts trained on: training FLOPs (3 x 2 x (linear +
attention MACs)) of GPT / DPAR per image.

Training step: forward, the trainer's chunked loss, backward and AdamW step on random codes
(LlamaGen's dropouts); DPAR's PatchLayouts are built beforehand on the host (pinned on CUDA), as
the trainer's data workers do, and copied with non_blocking=True inside the step. --compile
model compiles the whole model (train_c2i.py's default), --compile blocks each transformer
block. images/s = batch / median step time; tokens/s = images/s x T.
Peak memory (bytes, one extra step per model after the timed ones): CUDA max_memory_allocated
(weights, optimizer state and activations); CPU, after returning free heap pages to the system
(malloc_trim), the growth of the resident set's high-water mark (VmHWM, reset through
/proc/self/clear_refs) during the step: activations, gradients and temporaries.
MFU: training FLOPs x images/s over the measured dense matmul rate of the training dtype on
this device (bf16 on CUDA).

Sampling (no_grad, guidance scale 4, batch --sample-batch): GPT and incremental DPAR generate
--sample-tokens tokens (default all T), the reference DPAR path (re-runs the teacher-forced
forward on the prefix every step) --reference-tokens tokens; images/s = batch x tokens /
(T x seconds), i.e. linear in the tokens generated (for the reference path that flatters it:
its steps grow with the prefix; a GPT generating fewer than T tokens also gets a shorter KV
cache than a whole image needs). DPAR's entropy model is a GPT (--entropy-model) with a random
head, its threshold calibrated to the target compression on random codes.

Defaults: on the CPU GPT-XS vs DPAR-XS, vocabulary 1024, batch 8, 1 warm-up + 5 measured steps,
float32, eager, entropy model GPT-T; on CUDA GPT-L vs DPAR-L, vocabulary 16384, batch 32, 4 + 10
steps, bf16 autocast, whole-model compile, entropy model GPT-S.
"""
import argparse
import ctypes
import functools
import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from autoregressive.models import build_model
from autoregressive.models.attention import BACKENDS, set_attention_backend
from autoregressive.models.dpar import DPAR_models, build_patch_layout
from autoregressive.models.generate import Decoding, Sampling, draw_uniforms, generate, reference_generate_dpar
from autoregressive.models.gpt import GPT_models
from autoregressive.train.model import compile_model
from entropy_model.calibrate import threshold_for_compression
from entropy_model.entropy import teacher_forced_entropy
from entropy_model.patching import PatchingConfig, paper_threshold, patch_lengths_from_starts, patch_starts
from evaluations.flops import flops_per_image
from utils.cli import HelpFormatter

DEFAULT_COMPRESSION = {256: 1.81, 384: 2.06}
ROW_KEYS = (
    "gpt_model", "dpar_model", "image_size", "compression", "flops_ratio", "train_images_per_s_gpt",
    "train_images_per_s_dpar", "train_speedup", "sample_images_per_s_gpt", "sample_images_per_s_dpar",
    "sample_images_per_s_dpar_reference", "peak_mem_gpt", "peak_mem_dpar",
)


# --------------------------------------------------------------------------------------
# Patch layouts
# --------------------------------------------------------------------------------------
def synthetic_entropies(n: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    """(n, grid*grid) float32 scores: unit noise smoothed over 3x3 neighbourhoods (flat regions
    form long runs) plus a per-image offset (simple and busy images)."""
    noise = torch.randn(n, 1, grid, grid, generator=generator)
    field = F.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False).flatten(1) * 3.0  # (n, T)
    return field + 0.5 * torch.randn(n, 1, generator=generator)


def synthetic_patch_lengths(
    num_batches: int, batch_size: int, grid: int, compression: float, max_patch_length: int = 4, seed: int = 0
) -> List[torch.Tensor]:
    """num_batches zero-padded (B, M) patch-length batches from the paper's rule (row reset,
    length cap), each batch's threshold calibrated to `compression` tokens per patch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        e = synthetic_entropies(batch_size, grid, g)
        tau, _ = threshold_for_compression(e, compression, max_patch_length, grid)
        out.append(patch_lengths_from_starts(patch_starts(e, tau, max_patch_length, grid)))
    return out


def stored_patch_lengths(
    entropy_path: str, threshold: float, max_patch_length: Optional[int], num_batches: int, batch_size: int,
    seed: int = 0,
) -> List[torch.Tensor]:
    """Batches of patch lengths from a code store's entropy.npy (random rows), row reset on."""
    from entropy_model.calibrate import read_entropy_file, sample_entropies, store_grid_width

    entropy, _ = read_entropy_file(entropy_path)
    width = store_grid_width(entropy_path, entropy.shape[-1])
    rows = sample_entropies(entropy, num_batches * batch_size, seed)  # (S, T)
    if rows.shape[0] < num_batches * batch_size:
        raise ValueError(f"{entropy_path} holds {rows.shape[0]} entropy rows, fewer than {num_batches} batches")
    config = PatchingConfig("entropy", threshold, max_patch_length, True)
    return [config.lengths(chunk, width) for chunk in rows.split(batch_size)[:num_batches]]


# --------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------
def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"cpu: {cpu}, {torch.get_num_threads()} threads{load}, torch {torch.__version__}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def peak_memory(step: Callable[[], None], device: torch.device) -> Optional[int]:
    """Peak memory (bytes) of one call. CUDA: max_memory_allocated. CPU (Linux, glibc): free
    heap pages are returned to the system first (malloc_trim), so every page the call touches
    counts: growth of the resident set's high-water mark (VmHWM, reset through
    /proc/self/clear_refs) over the resident set before the call. None where unavailable."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim") or not os.path.exists("/proc/self/clear_refs"):
        step()
        return None
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _kib("VmRSS")
    step()
    return (_kib("VmHWM") - before) * 1024


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s of this device (square products, best of a few)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        synchronize(device)
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - t) / 3)
    return 2 * n**3 / best


def interleaved(steps: Dict[str, Callable[[int], None]], warmup: int, repeats: int, device: torch.device,
                measure_memory: bool = False):
    """Run the steps alternately warmup + repeats times. Returns per name the measured times
    (seconds) after warm-up and, with measure_memory, the peak memory of one more step each
    (measured apart from the timed steps: the CPU measurement slows the step it measures)."""
    times = {name: [] for name in steps}
    for r in range(warmup + repeats):
        for name, step in steps.items():
            synchronize(device)
            t = time.perf_counter()
            step(r)
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    peaks = {}
    if measure_memory:
        r = warmup + repeats
        peaks = {name: peak_memory(lambda: step(r), device) for name, step in steps.items()}
    return times, peaks


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
@dataclass
class Trainee:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[int], None]


def make_trainee(
    name: str, image_size: int, vocab_size: int, batch_size: int, device: torch.device, amp: Optional[torch.dtype],
    compile_scope: Optional[str] = None, patch_batches: Optional[List[torch.Tensor]] = None, num_classes: int = 1000,
    seed: int = 0, compile_backend: str = "inductor", **model_kwargs,
) -> Trainee:
    """A registry model on `device` with AdamW and a step(i) that trains on batch i (cycled).
    compile_scope: None, "model" or "blocks" (autoregressive.train.model.compile_model)."""
    T = (image_size // 16) ** 2
    torch.manual_seed(seed)
    model = build_model(name, vocab_size=vocab_size, block_size=T, num_classes=num_classes, **model_kwargs)
    model.to(device).train()
    if compile_scope is not None:
        compile_model(model, compile_scope, compile_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    g = torch.Generator().manual_seed(seed)
    count = len(patch_batches) if patch_batches else 4
    codes = [torch.randint(0, vocab_size, (batch_size, T), generator=g).to(device) for _ in range(count)]
    labels = [torch.randint(0, num_classes, (batch_size,), generator=g).to(device) for _ in range(count)]
    layouts = [build_patch_layout(b, model.config) for b in patch_batches or []]  # as the data workers do
    if device.type == "cuda":
        layouts = [layout.pin_memory() for layout in layouts]

    def step(i: int) -> None:
        k = i % count
        extra = (layouts[k].to(device, non_blocking=True).mark_dynamic(),) if layouts else ()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            _, loss = model(codes[k][:, :-1], labels[k], *extra, targets=codes[k])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Trainee(model, optimizer, step)


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------
def calibrated_entropy_model(name: str, T: int, vocab_size: int, compression: float, device: torch.device,
                             seed: int = 0):
    """A GPT entropy model with a random head (entropies that vary) and the patching rule whose
    threshold gives `compression` tokens per patch on random codes."""
    torch.manual_seed(seed)
    model = GPT_models[name](vocab_size=vocab_size, block_size=T, model_type="uncond")
    torch.nn.init.normal_(model.output.weight, std=2.0 / math.sqrt(model.config.dim))
    model.to(device).eval()
    codes = torch.randint(0, vocab_size, (16, T), generator=torch.Generator().manual_seed(seed)).to(device)
    e = teacher_forced_entropy(model, codes).float().cpu()
    grid = math.isqrt(T)
    tau, _ = threshold_for_compression(e, compression, 4, grid)
    return model, PatchingConfig("entropy", tau, 4, True)


def time_generation(model, batch: int, tokens: int, device: torch.device, decoding: Optional[Decoding] = None,
                    warmup_tokens: int = 0, reference: bool = False, **dpar_kwargs) -> dict:
    """One timed generation of `tokens` tokens per image for `batch` images with guidance 4
    (2 x batch rows): seconds, ms per token step, images/s = batch x tokens / (T x seconds)
    and, for DPAR, the mean patch count. warmup_tokens: an untimed generation first (compiles
    and captures the step functions). reference: DPAR's re-running reference path."""
    T = model.config.block_size
    cond = torch.arange(batch, device=device) % model.config.num_classes
    sampling = Sampling(cfg_scale=4.0)

    def run(n: int):
        g = torch.Generator().manual_seed(0)
        if reference:
            uniforms = draw_uniforms(batch, n, g).to(device)
            return reference_generate_dpar(model, cond, n, sampling, uniforms, **dpar_kwargs)
        return generate(model, cond, n, cfg_scale=4.0, generator=g, decoding=decoding, **dpar_kwargs)

    with torch.no_grad():
        if warmup_tokens:
            run(warmup_tokens)
        synchronize(device)
        started = time.perf_counter()
        out = run(tokens)
        synchronize(device)
        seconds = time.perf_counter() - started
    result = {"batch": batch, "tokens": tokens, "seconds": seconds, "step_ms": 1e3 * seconds / tokens,
              "images_per_s": batch * tokens / (T * seconds)}
    if out.num_patches is not None:
        result["patches_per_image"] = out.num_patches.float().mean().item()
    return result


def sample_rates(gpt, dpar, entropy_model, patching: PatchingConfig, batch: int, tokens: int, reference_tokens: int,
                 device: torch.device, repeats: int = 1, decoding: Optional[Decoding] = None) -> dict:
    """Seconds and images/s of GPT, incremental DPAR and reference DPAR sampling (guidance 4);
    decoding: how the incremental steps run (default eager)."""
    T = gpt.config.block_size
    cond = torch.arange(batch, device=device) % gpt.config.num_classes
    g = torch.Generator().manual_seed(0)
    sampling = Sampling(cfg_scale=4.0)
    out = {}
    gpt.eval(), dpar.eval()

    def gpt_run(r: int):
        generate(gpt, cond, tokens, cfg_scale=4.0, generator=g, decoding=decoding)

    def dpar_run(r: int):
        out["dpar_patches"] = generate(dpar, cond, tokens, cfg_scale=4.0, generator=g, entropy_model=entropy_model,
                                       patching=patching, decoding=decoding).num_patches.float().mean().item()

    def reference_run(r: int):
        uniforms = draw_uniforms(batch, reference_tokens, g).to(device)
        reference_generate_dpar(dpar, cond, reference_tokens, sampling, uniforms, entropy_model, patching)

    with torch.no_grad():
        times, _ = interleaved({"gpt": gpt_run, "dpar": dpar_run}, 1 if device.type == "cuda" else 0, repeats, device)
        ref_times, _ = interleaved({"reference": reference_run}, 0, 1, device)
    for name, n, seconds in (("gpt", tokens, times["gpt"]), ("dpar", tokens, times["dpar"]),
                             ("reference", reference_tokens, ref_times["reference"])):
        s = statistics.median(seconds)
        out[f"{name}_seconds"] = s
        out[f"{name}_step_ms"] = 1e3 * s / n
        out[f"{name}_images_per_s"] = batch * n / (T * s)
    gpt.train(), dpar.train()
    return out


# --------------------------------------------------------------------------------------
# One comparison
# --------------------------------------------------------------------------------------
def compare(args: argparse.Namespace, image_size: int, device: torch.device) -> tuple:
    """(row with the JSON keys, details for the printed table) for one resolution."""
    grid = image_size // 16
    T = grid * grid
    compression = args.compression or DEFAULT_COMPRESSION.get(image_size)
    if args.entropy_path:
        batches = stored_patch_lengths(args.entropy_path, args.threshold, args.max_patch_length or None,
                                       args.num_batches, args.batch_size)
    else:
        if compression is None:
            raise ValueError(f"no default compression at {image_size} px; pass --compression")
        batches = synthetic_patch_lengths(args.num_batches, args.batch_size, grid, compression,
                                          args.max_patch_length or T)
    counts = torch.cat([(b > 0).sum(-1) for b in batches])
    compression = T / counts.float().mean().item()
    common = dict(vocab_size=args.vocab_size, num_classes=args.num_classes)
    gpt_flops = flops_per_image(args.gpt_model, image_size, **common)
    dpar_flops = flops_per_image(args.dpar_model, image_size, patch_counts=counts.numpy(), **common)
    flops_ratio = gpt_flops["training_flops"] / dpar_flops["training_flops"]

    amp = torch.bfloat16 if args.bf16 else None
    build = dict(image_size=image_size, vocab_size=args.vocab_size, batch_size=args.batch_size, device=device,
                 amp=amp, compile_scope=None if args.compile == "none" else args.compile, num_classes=args.num_classes)
    gpt = make_trainee(args.gpt_model, **build)
    dpar = make_trainee(args.dpar_model, patch_batches=batches, patch_packing=args.packing, **build)
    times, peak = interleaved({"gpt": gpt.step, "dpar": dpar.step}, args.warmup, args.steps, device, True)
    gpt_s, dpar_s = statistics.median(times["gpt"]), statistics.median(times["dpar"])
    speedup = statistics.median(a / b for a, b in zip(times["gpt"], times["dpar"]))
    del gpt.optimizer, dpar.optimizer

    entropy_model, patching = calibrated_entropy_model(args.entropy_model, T, args.vocab_size, compression, device)
    sample = sample_rates(gpt.model, dpar.model, entropy_model, patching, args.sample_batch,
                          args.sample_tokens or T, min(args.reference_tokens, T), device)
    rate = matmul_rate(device, torch.bfloat16 if args.bf16 else torch.float32)
    row = {
        "gpt_model": args.gpt_model,
        "dpar_model": args.dpar_model,
        "image_size": image_size,
        "compression": compression,
        "flops_ratio": flops_ratio,
        "train_images_per_s_gpt": args.batch_size / gpt_s,
        "train_images_per_s_dpar": args.batch_size / dpar_s,
        "train_speedup": speedup,
        "sample_images_per_s_gpt": sample["gpt_images_per_s"],
        "sample_images_per_s_dpar": sample["dpar_images_per_s"],
        "sample_images_per_s_dpar_reference": sample["reference_images_per_s"],
        "peak_mem_gpt": peak["gpt"],
        "peak_mem_dpar": peak["dpar"],
    }
    details = {
        "tokens": T,
        "linear_ratio": gpt_flops["forward_macs"] / dpar_flops["forward_macs"],
        "mfu_gpt": gpt_flops["training_flops"] * row["train_images_per_s_gpt"] / rate,
        "mfu_dpar": dpar_flops["training_flops"] * row["train_images_per_s_dpar"] / rate,
        "matmul_tflops": rate / 1e12,
        "step_times": times,
        "sample": sample,
    }
    return row, details


def _fmt_mem(b: Optional[int]) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def format_table(row: dict, details: dict) -> str:
    """Text table: GPT, DPAR, DPAR/GPT, and the FLOPs ratio beside the speed ratios."""
    T = details["tokens"]
    s = details["sample"]
    lines = [
        f"{row['gpt_model']} vs {row['dpar_model']} at {row['image_size']} px ({T} tokens), "
        f"compression {row['compression']:.2f} tokens/patch, DPAR {s['dpar_patches']:.0f} patches/image sampled",
        f"FLOPs ratio GPT/DPAR: training {row['flops_ratio']:.3f}, "
        f"linear layers (paper's unit) {details['linear_ratio']:.3f}",
        f"{'':34}{'GPT':>12}{'DPAR':>12}{'DPAR/GPT':>10}",
    ]

    def add(name, gpt, dpar, ratio=None, fmt="{:12.2f}"):
        r = ratio if ratio is not None else (dpar / gpt if gpt and dpar else float("nan"))
        lines.append(f"{name:34}{fmt.format(gpt)}{fmt.format(dpar)}{r:10.3f}")

    add("train images/s", row["train_images_per_s_gpt"], row["train_images_per_s_dpar"], row["train_speedup"])
    add("train tokens/s", row["train_images_per_s_gpt"] * T, row["train_images_per_s_dpar"] * T, row["train_speedup"],
        "{:12.0f}")
    add("train MFU (%)", 100 * details["mfu_gpt"], 100 * details["mfu_dpar"])
    gpt_mem, dpar_mem = row["peak_mem_gpt"], row["peak_mem_dpar"]
    ratio = dpar_mem / gpt_mem if gpt_mem and dpar_mem else float("nan")
    lines.append(f"{'peak train memory':34}{_fmt_mem(gpt_mem):>12}{_fmt_mem(dpar_mem):>12}{ratio:10.3f}")
    add("sample images/s (incremental)", row["sample_images_per_s_gpt"], row["sample_images_per_s_dpar"])
    add("sample ms/token step", s["gpt_step_ms"], s["dpar_step_ms"])
    lines.append(f"{'sample images/s, DPAR reference':34}{'':12}{row['sample_images_per_s_dpar_reference']:12.3f}"
                 f"{row['sample_images_per_s_dpar'] / row['sample_images_per_s_dpar_reference']:10.1f}"
                 "  (incremental / reference)")
    lines.append(f"train speed-up / FLOPs ratio: {row['train_speedup'] / row['flops_ratio']:.2f}; "
                 f"matmul rate {details['matmul_tflops']:.3f} TFLOP/s")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description="Training and sampling throughput of a GPT / DPAR pair, alternating "
                                            "their steps, beside the FLOPs ratio.",
                                formatter_class=HelpFormatter)
    p.add_argument("--json", default=None, help="write {device, rows} here")
    p.add_argument("--gpt-model", choices=sorted(GPT_models), default="GPT-L" if cuda else "GPT-XS",
                   help="baseline registry name (default: GPT-L on CUDA, GPT-XS on CPU)")
    p.add_argument("--dpar-model", choices=sorted(DPAR_models), default="DPAR-L" if cuda else "DPAR-XS",
                   help="DPAR registry name (default: DPAR-L on CUDA, DPAR-XS on CPU)")
    p.add_argument("--image-size", type=int, nargs="+", default=[384], help="one row per size (multiples of 16)")
    p.add_argument("--vocab-size", type=int, default=16384 if cuda else 1024, help="codebook size")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the class embedding")
    p.add_argument("--batch-size", type=int, default=32 if cuda else 8, help="training batch")
    p.add_argument("--steps", type=int, default=10 if cuda else 5, help="measured steps per model")
    p.add_argument("--warmup", type=int, default=4 if cuda else 1,
                   help="unmeasured steps per model first (cover the --num-batches layouts: compilation)")
    p.add_argument("--num-batches", type=int, default=4, help="distinct patch layouts cycled through")
    g = p.add_argument_group("patches")
    g.add_argument("--compression", type=float, default=None, help="mean tokens per patch (default 1.81 at 256 px, "
                                                                    "2.06 at 384 px)")
    g.add_argument("--entropy-path", default=None, help="code store with entropy.npy: use its entropies")
    g.add_argument("--threshold", type=float, default=paper_threshold(), help="entropy threshold with --entropy-path")
    g.add_argument("--max-patch-length", type=int, default=4, help="length cap (0 = none)")
    g.add_argument("--packing", choices=("auto", "packed", "padded"), default="auto",
                   help="DPAR's patch-transformer layout (DPARConfig.patch_packing)")
    g = p.add_argument_group("execution")
    g.add_argument("--compile", choices=("none", "model", "blocks"), default="model" if cuda else "none",
                   help="torch.compile the whole model or each transformer block (default: model on CUDA)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=cuda,
                   help="bf16 autocast (default on CUDA)")
    g.add_argument("--attention", choices=BACKENDS, default=None, help="attention backend (default: automatic)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g = p.add_argument_group("sampling")
    g.add_argument("--sample-batch", type=int, default=64 if cuda else 8,
                   help="images per sampling batch (x2 with guidance)")
    g.add_argument("--sample-tokens", type=int, default=0, help="tokens per sampled image (0 = all)")
    g.add_argument("--reference-tokens", type=int, default=24, help="tokens for the reference DPAR path")
    g.add_argument("--entropy-model", choices=sorted(GPT_models), default="GPT-S" if cuda else "GPT-T",
                   help="entropy model registry name (default: GPT-S on CUDA, GPT-T on CPU)")
    args = p.parse_args(argv)
    for size in args.image_size:
        if size % 16 or size < 32:
            p.error(f"--image-size {size} is not a multiple of 16 (>= 32)")
    if min(args.batch_size, args.steps, args.sample_batch, args.num_batches) < 1 or args.warmup < 0:
        p.error("batch sizes, steps and batches must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention:
        set_attention_backend(args.attention)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result = {"device": describe_device(device), "rows": []}
    print(result["device"], flush=True)
    try:
        for size in args.image_size:
            row, details = compare(args, size, device)
            result["rows"].append({k: row[k] for k in ROW_KEYS})
            print(format_table(row, details), flush=True)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
