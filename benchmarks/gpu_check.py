"""One-GPU check (scripts/gpu_check.sh): decoding speed, attention backends against a float64
reference, and training throughput of GPT vs DPAR at real sizes. Each section has its own time
limit (SECTION_LIMITS, --time-limit) and records its own failure; calls with different
--sections add to the same OUT/gpu_check.json, so the sections can run as separate processes
(the launcher does) or separate sessions on the GPU machine.

    python -m benchmarks.gpu_check --out results/gpu_check --sections decoding    # first: at risk
    python -m benchmarks.gpu_check --out results/gpu_check --sections attention training
    python -m benchmarks.gpu_check --out /tmp/check --dry-run       # same code, CPU, tiny sizes

Sections (in the default order; results in OUT/gpu_check.json):
  attention  each backend available on the device (sdpa, flex, varlen) in bf16: dense causal
             attention and packed document-causal attention (ragged documents plus padding
             slots), outputs and q/k/v gradients against float64 attention, relative error
             ||x - ref|| / ||ref|| (pass: <= 2e-2); plus DPAR's segment attention.
  training   GPT-B vs DPAR-B at 256 px (batch 64) and GPT-L vs DPAR-L at 384 px (batch 32),
             bf16 autocast, the trainer's step (chunked loss, layouts built on the host), two
             compile scopes: the whole model (train_c2i.py's default) and each transformer block;
             alternating steps after a warm-up that covers every patch layout
             (benchmarks.benchmark; the packed dimensions are marked dynamic from the first
             step, so no static graph is compiled and thrown away), patch layouts at the
             paper's compression (1.81 / 2.06):
             images/s, speed-up, FLOPs ratio, MFU against the measured bf16 matmul rate, peak
             memory, graphs compiled per model, recompiles after warm-up and graph breaks.
  decoding   whole images at batch 256 with guidance (512 rows), bf16 weights: GPT-L and
             incremental DPAR-L (entropy model GPT-S) at 384 px, each on the fast path
             (compiled steps in CUDA graphs, timed after a whole-image warm-up) and eager;
             incremental DPAR-L vs the re-running reference path (8 images) over whole 256-token
             images. ms per token step, images/s = batch x tokens / (T x seconds), and the
             issue's targets (GPT-L <= 5 ms/step, DPAR/GPT >= 1.3x, incremental/reference >= 10x).
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
from autoregressive.models.generate import Decoding, fast_decoding
from benchmarks import benchmark
from utils.cli import HelpFormatter

TOLERANCE = 2e-2
SECTIONS = ("decoding", "attention", "training")  # decoding first: its compile and capture are the longest risk
SECTION_LIMITS = {"decoding": 300.0, "attention": 60.0, "training": 300.0}  # seconds; runs in flight finish


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


COMPILE_SCOPES = ("model", "blocks")  # whole-model compile (the trainer's default) first


def _graph_counts() -> tuple:
    """(graphs compiled, graph breaks) so far in this process (Dynamo's counters)."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _counted(step: Callable[[int], None], warmup: int, stats: dict) -> Callable[[int], None]:
    """step, with the graphs it compiles counted into stats: during warm-up ("graphs") and
    after it ("recompiles_after_warmup", which should stay 0), plus graph breaks."""

    def run(r: int) -> None:
        graphs, breaks = _graph_counts()
        step(r)
        new_graphs, new_breaks = _graph_counts()
        stats["graphs" if r < warmup else "recompiles_after_warmup"] += new_graphs - graphs
        stats["graph_breaks"] += new_breaks - breaks

    return run


def _measure_scope(scope: str, gpt_name: str, dpar_name: str, batches: list, build: dict, flops: tuple,
                   rate: float, warmup: int, steps: int, device: torch.device, backend: str) -> dict:
    """One compile scope: GPT and DPAR trained alternately; images/s, MFU, memory, graph counts."""
    gpt = benchmark.make_trainee(gpt_name, compile_scope=scope, compile_backend=backend, **build)
    dpar = benchmark.make_trainee(dpar_name, patch_batches=batches, compile_scope=scope, compile_backend=backend,
                                  **build)
    graphs = {name: {"graphs": 0, "recompiles_after_warmup": 0, "graph_breaks": 0} for name in ("gpt", "dpar")}
    runs = {name: _counted(t.step, warmup, graphs[name]) for name, t in (("gpt", gpt), ("dpar", dpar))}
    times, peaks = benchmark.interleaved(runs, warmup, steps, device, True)
    batch = build["batch_size"]
    gpt_ips = batch / sorted(times["gpt"])[len(times["gpt"]) // 2]
    dpar_ips = batch / sorted(times["dpar"])[len(times["dpar"]) // 2]
    return dict(
        train_images_per_s_gpt=gpt_ips,
        train_images_per_s_dpar=dpar_ips,
        train_speedup=sorted(a / b for a, b in zip(times["gpt"], times["dpar"]))[len(times["gpt"]) // 2],
        mfu_gpt=flops[0] * gpt_ips / rate,
        mfu_dpar=flops[1] * dpar_ips / rate,
        peak_mem_gpt=peaks["gpt"],
        peak_mem_dpar=peaks["dpar"],
        step_seconds=times,
        compiled_graphs=graphs,
    )


def check_training(device: torch.device, dry_run: bool, steps: int, warmup: int, deadline: float,
                   scopes: Sequence[str] = COMPILE_SCOPES) -> List[dict]:
    """GPT vs DPAR training throughput at real sizes (bf16), per compile scope: the whole model
    compiled (one graph per model; DPAR's packed lengths are bucketed, so its graphs stay few)
    and each transformer block compiled. Scopes run in order over both sizes (L first: the
    paper's headline pair), so a time limit drops the comparison scope, not the new path. The
    top-level numbers of an entry are its first scope's."""
    configs = [("GPT-T", "DPAR-T", 96, 2)] if dry_run else [("GPT-L", "DPAR-L", 384, 32), ("GPT-B", "DPAR-B", 256, 64)]
    compile_backend = "eager" if dry_run else "inductor"
    vocab, classes = (64, 10) if dry_run else (16384, 1000)
    rate = benchmark.matmul_rate(device, torch.bfloat16)
    results, measurable = [], []  # (entry, patch batches, training FLOPs per image)
    for gpt_name, dpar_name, size, batch in configs:
        entry = {"gpt_model": gpt_name, "dpar_model": dpar_name, "image_size": size, "batch_size": batch,
                 "scopes": {}, "seconds": 0.0}
        try:
            grid = size // 16
            compression = benchmark.DEFAULT_COMPRESSION.get(size, 1.81)
            batches = benchmark.synthetic_patch_lengths(4, batch, grid, compression)
            counts = torch.cat([(b > 0).sum(-1) for b in batches])
            common = dict(vocab_size=vocab, num_classes=classes)
            gpt_flops = benchmark.flops_per_image(gpt_name, size, **common)["training_flops"]
            dpar_flops = benchmark.flops_per_image(dpar_name, size, patch_counts=counts.numpy(),
                                                   **common)["training_flops"]
            entry.update(tokens=grid * grid, compression=grid * grid / counts.float().mean().item(),
                         flops_ratio=gpt_flops / dpar_flops, matmul_tflops=rate / 1e12)
            measurable.append((entry, batches, (gpt_flops, dpar_flops)))
        except Exception as e:
            entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:1000], traceback=traceback.format_exc()[-2000:])
        results.append(entry)
    for scope in scopes:
        for entry, batches, flops in measurable:
            if time.time() > deadline:
                entry["scopes"][scope] = {"ok": False, "error": "skipped: time limit"}
                continue
            started = time.time()
            counters.clear()
            build = dict(image_size=entry["image_size"], vocab_size=vocab, batch_size=entry["batch_size"],
                         device=device, amp=torch.bfloat16, num_classes=classes)
            try:
                # the warm-up covers every layout: each new packed length is compiled before timing
                result = _measure_scope(scope, entry["gpt_model"], entry["dpar_model"], batches, build, flops, rate,
                                        max(warmup, len(batches)), steps, device, compile_backend)
                result.update(speedup_over_flops_ratio=result["train_speedup"] / entry["flops_ratio"],
                              dynamo_stats=dict(counters["stats"]), ok=True)
            except Exception as e:
                result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000],
                          "traceback": traceback.format_exc()[-2000:]}
            result["seconds"] = time.time() - started
            entry["scopes"][scope] = result
            entry["seconds"] += result["seconds"]
            torch._dynamo.reset()  # each scope and size compiles its own graphs
            _release(device)
    for entry, _, _ in measurable:
        first = entry["scopes"].get(scopes[0], {}) if scopes else {}
        entry.update({k: v for k, v in first.items() if k not in ("ok", "error", "traceback", "seconds")})
        entry["compile_scope"] = scopes[0] if scopes else None
        entry["ok"] = bool(first.get("ok"))
        if not entry["ok"]:
            entry["error"] = first.get("error", "no compile scope measured")
    return results


def _decode_runs(device: torch.device, dry_run: bool, tokens: Optional[int], reference_tokens: Optional[int],
                 reference_batch: int, deadline: float, runs: Dict[str, dict],
                 progress: Callable[[], None] = lambda: None) -> Dict[str, dict]:
    """Timed whole-image generations into `runs`, fastest-first so that a time limit cuts the
    least useful; progress() is called after each run (a killed process keeps what it measured)."""
    names = (("GPT-T", "DPAR-T", "GPT-T", 96, 64, 4) if dry_run else ("GPT-L", "DPAR-L", "GPT-S", 384, 256, 256))
    gpt_name, dpar_name, entropy_name, size, reference_size, batch = names
    vocab, classes = (64, 10) if dry_run else (16384, 1000)
    dtype = torch.float32 if dry_run else torch.bfloat16
    graph = Decoding(compile=True, backend="eager") if dry_run else fast_decoding(device)
    eager = Decoding()

    def models(image_size: int):
        T = (image_size // 16) ** 2
        torch.manual_seed(0)
        gpt = build_model(gpt_name, vocab_size=vocab, block_size=T, num_classes=classes).to(device, dtype).eval()
        dpar = build_model(dpar_name, vocab_size=vocab, block_size=T, num_classes=classes).to(device, dtype).eval()
        compression = benchmark.DEFAULT_COMPRESSION.get(image_size, 1.81)
        entropy_model, patching = benchmark.calibrated_entropy_model(entropy_name, T, vocab, compression, device)
        return gpt, dpar, dict(entropy_model=entropy_model.to(dtype), patching=patching), T

    def timed(name: str, model, n: int, decoding: Optional[Decoding], warmup: int, batch_size: int, **kwargs):
        if time.time() > deadline:
            runs[name] = {"ok": False, "error": "skipped: time limit"}
            return
        started = time.time()
        torch._dynamo.reset()
        try:
            runs[name] = dict(benchmark.time_generation(model, batch_size, n, device, decoding, warmup, **kwargs),
                              ok=True)
        except Exception as e:  # recorded, the check goes on
            runs[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000],
                          "traceback": traceback.format_exc()[-2000:]}
        for m in (model, kwargs.get("entropy_model")):
            if m is not None:
                m.remove_caches()
        runs[name]["wall_seconds"] = time.time() - started
        runs[name]["image_size"] = image_size_of(name)
        _release(device)
        progress()

    def image_size_of(name: str) -> int:
        return reference_size if name in ("dpar_incremental_ref", "dpar_reference") else size

    gpt, dpar, dpar_kwargs, T = models(size)
    n = min(tokens or T, T)
    timed("gpt_graph", gpt, n, graph, n, batch)
    timed("dpar_graph", dpar, n, graph, n, batch, **dpar_kwargs)
    timed("gpt_eager", gpt, n, eager, min(n, 8), batch)
    timed("dpar_eager", dpar, n, eager, min(n, 8), batch, **dpar_kwargs)
    gpt = dpar = dpar_kwargs = None
    _release(device)
    _, dpar, dpar_kwargs, T = models(reference_size)
    n = min(reference_tokens or T, T)
    timed("dpar_incremental_ref", dpar, n, eager, min(n, 8), batch, **dpar_kwargs)
    timed("dpar_reference", dpar, n, None, 0, reference_batch, reference=True, **dpar_kwargs)
    torch._dynamo.reset()
    return runs


def check_decoding(device: torch.device, dry_run: bool, tokens: Optional[int], reference_tokens: Optional[int],
                   deadline: float, reference_batch: Optional[int] = None,
                   progress: Callable[[dict], None] = lambda entry: None) -> dict:
    """Sampling speed over whole images at batch 256 with guidance (512 rows), bf16 weights:
    GPT-L and incremental DPAR-L (entropy model GPT-S) at 384 px, each eager and on the fast path
    (compiled steps in CUDA graphs, measured after a whole-image warm-up that compiles and
    captures them); DPAR-L incremental vs the re-running reference path at 256 px (the reference
    with fewer images). images/s = batch x tokens / (T x seconds). progress(entry) is called with
    the runs so far after each one."""
    if time.time() > deadline:
        return {"ok": False, "error": "skipped: time limit"}
    started = time.time()
    reference_batch = reference_batch or (2 if dry_run else 8)
    entry = {"batch_size": 4 if dry_run else 256, "cfg_scale": 4.0, "reference_batch_size": reference_batch,
             "ok": False, "error": "in progress", "runs": {}}
    runs = _decode_runs(device, dry_run, tokens, reference_tokens, reference_batch, deadline, entry["runs"],
                        lambda: progress(entry))

    def best(*names: str) -> Optional[dict]:
        done = [runs[name] for name in names if runs[name].get("ok")]
        return max(done, key=lambda r: r["images_per_s"]) if done else None

    gpt, dpar = best("gpt_graph", "gpt_eager"), best("dpar_graph", "dpar_eager")
    incremental, reference = best("dpar_incremental_ref"), best("dpar_reference")
    if gpt and dpar and incremental and reference:
        entry.update(
            gpt_step_ms=gpt["step_ms"],
            dpar_step_ms=dpar["step_ms"],
            reference_step_ms=reference["step_ms"],
            sample_images_per_s_gpt=gpt["images_per_s"],
            sample_images_per_s_dpar=dpar["images_per_s"],
            sample_images_per_s_dpar_reference=reference["images_per_s"],
            dpar_over_gpt=dpar["images_per_s"] / gpt["images_per_s"],
            dpar_over_reference=incremental["images_per_s"] / reference["images_per_s"],
        )
        graph_gpt = runs.get("gpt_graph", {})
        entry["targets"] = None if dry_run else {
            "gpt_graph_step_ms_at_most_5": bool(graph_gpt.get("ok") and graph_gpt["step_ms"] <= 5.0),
            "dpar_over_gpt_at_least_1.3": entry["dpar_over_gpt"] >= 1.3,
            "dpar_over_reference_at_least_10": entry["dpar_over_reference"] >= 10.0,
        }
        entry["ok"] = True
    else:
        failed = {k: r.get("error", "") for k, r in runs.items() if not r.get("ok")}
        entry.update(ok=False, error=f"runs failed or skipped: {failed}"[:1000])
    if entry["ok"]:
        entry.pop("error")
    entry["seconds"] = time.time() - started
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
        "decode_attention": attention.decode_attention_backend(device),
        "varlen_kernel": varlen[0] if varlen else None,
    }


def _save(report: dict, path: str) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)  # a killed run never leaves half a file


def _run_section(name: str, fn: Callable[[], object], report: Dict[str, object], path: str) -> None:
    started = time.time()
    try:
        report[name] = fn()
    except Exception as e:
        report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000],
                        "traceback": traceback.format_exc()[-2000:]}
    if isinstance(report[name], dict):
        report[name]["section_seconds"] = time.time() - started
    print(f"[gpu_check] {name} done in {time.time() - started:.0f} s", flush=True)
    _save(report, path)  # written after every section: a killed run keeps what it measured


def previous_report(path: str, environment: dict, dry_run: bool) -> Dict[str, object]:
    """The sections an earlier call wrote to `path` on the same machine and torch (so that
    separately run sections make one report), else a new report."""
    report: Dict[str, object] = {"environment": environment, "dry_run": dry_run}
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            return report
        if old.get("environment") == environment and old.get("dry_run") == dry_run:
            report.update({name: old[name] for name in SECTIONS if name in old})
    return report


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
        name = f"training {e['gpt_model']} vs {e['dpar_model']} @{e['image_size']}px batch {e['batch_size']}"
        for scope, r in e.get("scopes", {}).items():
            if not r.get("ok"):
                lines.append(f"{name} [{scope}]: {r.get('error', '')[:160]}")
                continue
            g = r["compiled_graphs"]
            lines.append(f"{name} [{scope}]: {r['train_images_per_s_gpt']:.1f} vs {r['train_images_per_s_dpar']:.1f} "
                         f"img/s, speed-up {r['train_speedup']:.2f} (FLOPs ratio {e['flops_ratio']:.2f}), MFU "
                         f"{100 * r['mfu_gpt']:.0f}% / {100 * r['mfu_dpar']:.0f}%, graphs {g['gpt']['graphs']} / "
                         f"{g['dpar']['graphs']}, recompiles after warm-up {g['gpt']['recompiles_after_warmup']} / "
                         f"{g['dpar']['recompiles_after_warmup']}, breaks {g['gpt']['graph_breaks']} / "
                         f"{g['dpar']['graph_breaks']}")
        if not e.get("scopes"):
            lines.append(f"{name}: {e.get('error', '')[:160]}")
    d = report.get("decoding", {})
    for name, r in d.get("runs", {}).items():
        if r.get("ok"):
            lines.append(f"decoding {name:22} {r['image_size']}px batch {r['batch']}: {r['step_ms']:.2f} ms/step, "
                         f"{r['images_per_s']:.2f} images/s")
        else:
            lines.append(f"decoding {name:22} {r.get('error', '')[:160]}")
    if d.get("ok"):
        lines.append(f"decoding fastest modes: DPAR/GPT images/s {d['dpar_over_gpt']:.2f}, incremental/reference "
                     f"{d['dpar_over_reference']:.1f}; targets {d['targets']}")
    elif d:
        lines.append(f"decoding: {d.get('error', '')[:160]}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Attention backends, training throughput and decoding speed on one GPU.",
                                formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check that the script works")
    p.add_argument("--steps", type=int, default=None, help="measured training steps per model (default 6; dry run 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps per model (training: at least one per patch layout, i.e. 4; default 4; "
                        "dry run 1)")
    p.add_argument("--compile-scopes", nargs="+", choices=COMPILE_SCOPES, default=list(COMPILE_SCOPES),
                   help="training: whole-model and/or per-block compile, measured in this order")
    p.add_argument("--decode-steps", type=int, default=None, help="tokens per image decoded (default: whole images)")
    p.add_argument("--reference-steps", type=int, default=None,
                   help="tokens per image on the reference path (default: whole 256-token images)")
    p.add_argument("--reference-batch", type=int, default=None, help="images on the reference path (default 8; dry 2)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds each section may run before its remaining runs are skipped (default per section: "
                        + ", ".join(f"{k} {v:.0f}" for k, v in SECTION_LIMITS.items()) + ")")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="parts of the check to run, in this order; each adds its results to OUT/gpu_check.json")
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
    warmup = args.warmup if args.warmup is not None else (1 if dry else 4)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    report = previous_report(path, environment(device), dry)

    def deadline(name: str) -> float:
        return time.time() + (args.time_limit if args.time_limit is not None else SECTION_LIMITS[name])

    def decoding_progress(entry: dict) -> None:
        report["decoding"] = entry
        _save(report, path)

    sections = {
        "attention": lambda: check_attention(device, dry),
        "training": lambda: check_training(device, dry, steps, warmup, deadline("training"), args.compile_scopes),
        "decoding": lambda: check_decoding(device, dry, args.decode_steps, args.reference_steps,
                                           deadline("decoding"), args.reference_batch, decoding_progress),
    }
    for name in args.sections:
        _run_section(name, sections[name], report, path)
    print(summary(report), flush=True)
    print(f"[gpu_check] results in {path}", flush=True)
    return report


if __name__ == "__main__":
    main()
