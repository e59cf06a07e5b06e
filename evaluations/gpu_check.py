"""One-GPU check (scripts/gpu_check.sh): attention backends against a float64 reference, then
training throughput and decoding speed of GPT vs DPAR at real sizes. Fits in about 8 minutes
on one H100/H200; every section records its own failure and the run goes on.

    python -m evaluations.gpu_check --out results/gpu_check          # on the GPU machine
    python -m evaluations.gpu_check --out /tmp/check --dry-run       # same code, CPU, tiny sizes

Sections (results in OUT/gpu_check.json):
  attention  each backend available on the device (sdpa, flex, varlen) in bf16: dense causal
             attention and packed document-causal attention (ragged documents plus padding
             slots), outputs and q/k/v gradients against float64 attention, relative error
             ||x - ref|| / ||ref|| (pass: <= 2e-2); plus DPAR's segment attention.
  training   GPT-B vs DPAR-B at 256 px (batch 64) and GPT-L vs DPAR-L at 384 px (batch 32),
             bf16 autocast, every transformer block compiled, alternating steps after warm-up
             (evaluations.benchmark), patch layouts at the paper's compression (1.81 / 2.06):
             images/s, speed-up, FLOPs ratio, MFU against the measured bf16 matmul rate, peak
             memory.
  decoding   GPT-L, incremental DPAR-L (entropy model GPT-S) and the reference DPAR path at
             batch 256 with guidance (512 rows), bf16 weights: ms per decoding step over a
             fixed number of steps from the start, and images/s = batch / (T x step time).
--dry-run runs the same sections on the CPU with GPT-T / DPAR-T at 96 px (36 tokens), tiny
batches and torch.compile's "eager" backend (graph capture without code generation).
"""
import argparse
import gc
import json
import os
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch._dynamo.utils import counters

from autoregressive.models import attention, build_model
from autoregressive.models.attention import (
    attend,
    available_backends,
    build_documents,
    segment_attend,
    set_attention_backend,
)
from autoregressive.models.modules import TransformerBlock
from evaluations import benchmark
from utils.cli import HelpFormatter

TOLERANCE = 2e-2


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def reference_documents(q, k, v, lengths: List[int]) -> torch.Tensor:
    """Float64 document-causal attention, one document at a time. q, k, v (1, H, N, D)."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        scores = q[..., s, :] @ k[..., s, :].transpose(-1, -2) / q.shape[-1] ** 0.5
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        out[..., s, :] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[..., s, :]
        start += n
    return out


def _errors(out, ref, inputs, rows) -> dict:
    """Relative errors of the output rows and of q/k/v gradients for a fixed random weighting."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = ref(*leaves)
    w = torch.randn(ref[..., rows, :].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = w.to(ref.device)
    (out[..., rows, :].float() * w.float()).sum().backward()
    (ref[..., rows, :] * w).sum().backward()
    errors = {"out": relative_error(out[..., rows, :].detach(), ref[..., rows, :].detach())}
    for name, ours, theirs in zip("qkv", inputs, leaves):
        errors[f"grad_{name}"] = relative_error(ours.grad, theirs.grad)
    return errors


def check_attention(device: torch.device, dry_run: bool) -> List[dict]:
    """Every available backend in bf16 on dense causal and packed document attention."""
    H, D = (4, 16) if dry_run else (16, 64)
    S = 40 if dry_run else 576
    lengths = [7, 1, 19, 12, 33, 2] if dry_run else [288, 1, 577, 300, 250, 143, 576, 9, 290, 333]
    N = -(-(sum(lengths) + 1) // 128) * 128
    g = torch.Generator().manual_seed(0)

    def inputs(B, L):
        return [torch.randn(B, H, L, D, generator=g).to(device, torch.bfloat16).requires_grad_() for _ in range(3)]

    docs = build_documents(torch.tensor(lengths), N, max_seqlen=max(lengths)).to(device)
    results = []
    backends = [b for b in available_backends(device) if device.type == "cuda" or b == "sdpa"]  # CPU flex: no backward
    for backend in backends:
        set_attention_backend(backend)
        for case in ("causal", "documents"):
            entry = {"backend": backend, "case": case}
            try:
                if case == "causal":
                    q, k, v = inputs(2, S)
                    out = attend(q, k, v)
                    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()

                    def ref(q, k, v):
                        scores = q @ k.transpose(-1, -2) / D**0.5
                        return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v

                    entry.update(_errors(out, ref, (q, k, v), slice(None)))
                else:
                    q, k, v = inputs(1, N)
                    out = attend(q, k, v, documents=docs.prepare())
                    entry.update(_errors(out, lambda q, k, v: reference_documents(q, k, v, lengths), (q, k, v),
                                         slice(0, sum(lengths))))
                entry["ok"] = max(v for key, v in entry.items() if key.startswith(("out", "grad"))) <= TOLERANCE
            except Exception as e:  # recorded, the check goes on
                entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
            results.append(entry)
    set_attention_backend(None)
    # DPAR's patch pooling attention (index ops, no backend choice) against dense masked softmax
    K, n = (50, 12) if dry_run else (4 * 575, 4 * 280)
    segment = torch.sort(torch.randint(0, n + 1, (K,), generator=g)).values.to(device)  # n = no segment
    q = torch.randn(n, H, D, generator=g).to(device, torch.bfloat16).requires_grad_()
    k, v = (torch.randn(K, H, D, generator=g).to(device, torch.bfloat16).requires_grad_() for _ in range(2))
    out = segment_attend(q, k, v, segment)[None]
    member = segment[None, :] == torch.arange(n, device=device)[:, None]  # (n, K)

    def segment_ref(q, k, v):
        scores = torch.einsum("nhd,khd->hnk", q, k) / D**0.5
        weights = scores.masked_fill(~member, float("-inf")).softmax(-1).nan_to_num()
        return torch.einsum("hnk,khd->nhd", weights, v)[None]

    entry = {"backend": "segment", "case": "patch pooling"}
    entry.update(_errors(out, segment_ref, (q, k, v), slice(None)))
    entry["ok"] = max(v for key, v in entry.items() if key.startswith(("out", "grad"))) <= TOLERANCE
    results.append(entry)
    return results


def _compile_blocks(model: torch.nn.Module, backend: str) -> None:
    for block in [m for m in model.modules() if isinstance(m, TransformerBlock)]:
        block.compile(backend=backend)


def check_training(device: torch.device, dry_run: bool, steps: int, warmup: int, deadline: float) -> List[dict]:
    """GPT vs DPAR training throughput at real sizes (compiled, bf16)."""
    configs = [("GPT-T", "DPAR-T", 96, 2)] if dry_run else [("GPT-B", "DPAR-B", 256, 64), ("GPT-L", "DPAR-L", 384, 32)]
    compile_backend = "eager" if dry_run else "inductor"
    vocab, classes = (64, 10) if dry_run else (16384, 1000)
    rate = benchmark.matmul_rate(device, torch.bfloat16)
    results = []
    for gpt_name, dpar_name, size, batch in configs:
        entry = {"gpt_model": gpt_name, "dpar_model": dpar_name, "image_size": size, "batch_size": batch}
        if time.time() > deadline:
            entry.update(ok=False, error="skipped: time limit")
            results.append(entry)
            continue
        started = time.time()
        counters.clear()
        try:
            grid = size // 16
            T = grid * grid
            compression = benchmark.DEFAULT_COMPRESSION.get(size, 1.81)
            batches = benchmark.synthetic_patch_lengths(4, batch, grid, compression)
            counts = torch.cat([(b > 0).sum(-1) for b in batches])
            common = dict(vocab_size=vocab, num_classes=classes)
            gpt_flops = benchmark.flops_per_image(gpt_name, size, **common)
            dpar_flops = benchmark.flops_per_image(dpar_name, size, patch_counts=counts.numpy(), **common)
            build = dict(image_size=size, vocab_size=vocab, batch_size=batch, device=device, amp=torch.bfloat16,
                         compile_blocks=False, num_classes=classes)
            gpt = benchmark.make_trainee(gpt_name, **build)
            dpar = benchmark.make_trainee(dpar_name, patch_batches=batches, **build)
            _compile_blocks(gpt.model, compile_backend)
            _compile_blocks(dpar.model, compile_backend)
            times, peaks = benchmark.interleaved({"gpt": gpt.step, "dpar": dpar.step}, warmup, steps, device, True)
            gpt_ips = batch / sorted(times["gpt"])[len(times["gpt"]) // 2]
            dpar_ips = batch / sorted(times["dpar"])[len(times["dpar"]) // 2]
            flops_ratio = gpt_flops["training_flops"] / dpar_flops["training_flops"]
            entry.update(
                tokens=T,
                compression=T / counts.float().mean().item(),
                flops_ratio=flops_ratio,
                train_images_per_s_gpt=gpt_ips,
                train_images_per_s_dpar=dpar_ips,
                train_speedup=sorted(a / b for a, b in zip(times["gpt"], times["dpar"]))[len(times["gpt"]) // 2],
                speedup_over_flops_ratio=dpar_ips / gpt_ips / flops_ratio,
                mfu_gpt=gpt_flops["training_flops"] * gpt_ips / rate,
                mfu_dpar=dpar_flops["training_flops"] * dpar_ips / rate,
                peak_mem_gpt=peaks["gpt"],
                peak_mem_dpar=peaks["dpar"],
                step_seconds={k: v for k, v in times.items()},
                matmul_tflops=rate / 1e12,
                dynamo_stats=dict(counters["stats"]),  # unique_graphs: one per block shape, none per batch
                ok=True,
            )
        except Exception as e:
            entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:1000], traceback=traceback.format_exc()[-2000:])
        entry["seconds"] = time.time() - started
        results.append(entry)
        gpt = dpar = None
        torch._dynamo.reset()  # each size compiles its own graphs; keep under the recompile limit
        _release(device)
    return results


def check_decoding(device: torch.device, dry_run: bool, steps: int, reference_steps: int, deadline: float) -> dict:
    """ms per decoding step at batch 256 with guidance: GPT-L, incremental DPAR-L, reference."""
    if time.time() > deadline:
        return {"ok": False, "error": "skipped: time limit"}
    gpt_name, dpar_name, entropy_name, size, batch = (("GPT-T", "DPAR-T", "GPT-T", 96, 4) if dry_run
                                                      else ("GPT-L", "DPAR-L", "GPT-S", 384, 256))
    vocab, classes = (64, 10) if dry_run else (16384, 1000)
    dtype = torch.float32 if dry_run else torch.bfloat16
    T = (size // 16) ** 2
    started = time.time()
    entry = {"gpt_model": gpt_name, "dpar_model": dpar_name, "entropy_model": entropy_name, "image_size": size,
             "batch_size": batch, "cfg_scale": 4.0, "steps": steps, "reference_steps": reference_steps}
    try:
        torch.manual_seed(0)
        gpt = build_model(gpt_name, vocab_size=vocab, block_size=T, num_classes=classes).to(device, dtype)
        dpar = build_model(dpar_name, vocab_size=vocab, block_size=T, num_classes=classes).to(device, dtype)
        compression = benchmark.DEFAULT_COMPRESSION.get(size, 1.81)
        entropy_model, patching = benchmark.calibrated_entropy_model(entropy_name, T, vocab, compression, device)
        entropy_model.to(dtype)
        rates = benchmark.sample_rates(gpt, dpar, entropy_model, patching, batch, steps, reference_steps, device)
        entry.update(
            gpt_step_ms=rates["gpt_step_ms"],
            dpar_step_ms=rates["dpar_step_ms"],
            reference_step_ms=rates["reference_step_ms"],
            sample_images_per_s_gpt=rates["gpt_images_per_s"],
            sample_images_per_s_dpar=rates["dpar_images_per_s"],
            sample_images_per_s_dpar_reference=rates["reference_images_per_s"],
            dpar_over_gpt=rates["dpar_images_per_s"] / rates["gpt_images_per_s"],
            dpar_over_reference=rates["dpar_images_per_s"] / rates["reference_images_per_s"],
            dpar_patches_in_prefix=rates["dpar_patches"],
            ok=True,
        )
    except Exception as e:
        entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:1000], traceback=traceback.format_exc()[-2000:])
    entry["seconds"] = time.time() - started
    _release(device)
    return entry


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    varlen = attention._varlen_kernel()
    return {
        "device": benchmark.describe_device(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "backends": list(available_backends(device)),
        "automatic_backend": attention.attention_backend(device),
        "varlen_kernel": varlen[0] if varlen else None,
    }


def _run_section(name: str, fn: Callable[[], object], report: Dict[str, object], path: str) -> None:
    started = time.time()
    try:
        report[name] = fn()
    except Exception as e:
        report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000],
                        "traceback": traceback.format_exc()[-2000:]}
    print(f"[gpu_check] {name} done in {time.time() - started:.0f} s", flush=True)
    with open(path, "w") as f:  # written after every section: a killed run keeps what it measured
        json.dump(report, f, indent=2)


def summary(report: dict) -> str:
    lines = [report["environment"]["device"]]
    for e in report.get("attention", []):
        if "error" in e:
            lines.append(f"attention {e['backend']:8} {e['case']:13} FAILED {e['error'][:120]}")
        else:
            worst = max(v for k, v in e.items() if k.startswith(("out", "grad")))
            verdict = "ok" if e["ok"] else "FAIL"
            lines.append(f"attention {e['backend']:8} {e['case']:13} worst rel. error {worst:.2e} {verdict}")
    for e in report.get("training", []):
        if not e.get("ok"):
            lines.append(f"training {e['gpt_model']} vs {e['dpar_model']}: {e.get('error', '')[:160]}")
            continue
        lines.append(f"training {e['gpt_model']} vs {e['dpar_model']} @{e['image_size']}px batch {e['batch_size']}: "
                     f"{e['train_images_per_s_gpt']:.1f} vs {e['train_images_per_s_dpar']:.1f} img/s, speed-up "
                     f"{e['train_speedup']:.2f} (FLOPs ratio {e['flops_ratio']:.2f}), MFU {100 * e['mfu_gpt']:.0f}% / "
                     f"{100 * e['mfu_dpar']:.0f}%")
    d = report.get("decoding", {})
    if d.get("ok"):
        lines.append(f"decoding batch {d['batch_size']} (cfg): GPT {d['gpt_step_ms']:.1f} ms/step, DPAR "
                     f"{d['dpar_step_ms']:.1f}, reference {d['reference_step_ms']:.1f}; DPAR/GPT images/s "
                     f"{d['dpar_over_gpt']:.2f}, DPAR/reference {d['dpar_over_reference']:.1f}")
    elif d:
        lines.append(f"decoding: {d.get('error', '')[:160]}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Attention backends, training throughput and decoding speed on one GPU.",
                                formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check that the script works")
    p.add_argument("--steps", type=int, default=None, help="measured training steps per model (default 6; dry run 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up training steps per model (default 3; dry run 1)")
    p.add_argument("--decode-steps", type=int, default=None, help="decoding steps timed (default 48; dry run 6)")
    p.add_argument("--reference-steps", type=int, default=None, help="reference-path steps (default 8; dry run 3)")
    p.add_argument("--time-limit", type=float, default=420.0, help="seconds after which remaining sections are skipped")
    p.add_argument("--sections", nargs="+", choices=("attention", "training", "decoding"),
                   default=["attention", "training", "decoding"], help="parts of the check to run")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; use --dry-run to exercise the check on the CPU")
    device = torch.device("cpu" if dry else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    steps = args.steps or (1 if dry else 6)
    warmup = args.warmup if args.warmup is not None else (1 if dry else 3)
    decode_steps = args.decode_steps or (6 if dry else 48)
    reference_steps = args.reference_steps or (3 if dry else 8)
    deadline = time.time() + args.time_limit
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    report: Dict[str, object] = {"environment": environment(device), "dry_run": dry}
    sections = {
        "attention": lambda: check_attention(device, dry),
        "training": lambda: check_training(device, dry, steps, warmup, deadline),
        "decoding": lambda: check_decoding(device, dry, decode_steps, reference_steps, deadline),
    }
    for name in args.sections:
        _run_section(name, sections[name], report, path)
    print(summary(report), flush=True)
    print(f"[gpu_check] results in {path}", flush=True)
    return report


if __name__ == "__main__":
    main()
