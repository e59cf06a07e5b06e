"""Real-compiler check on the CPU: inductor code generation (the tests mostly use the eager and
aot_eager backends, which capture graphs but generate no code), the compile cache across
processes, and the compile cost against eager decoding time (docs/performance.md, "Decode shapes
and warm-up").

    python -m benchmarks.compiler_check --out results/compiler_check      # every section
    python -m benchmarks.compiler_check --quick                           # GPT-T only, ~2 minutes

Every measurement runs in a child process of its own, so compile times include the compiler's
start-up as a user meets it. Results: OUT/compiler_check.json and one table on stdout.

Sections:
  decode   the decode step functions of a GPT and of a DPAR (entropy patching, guidance) through
           inductor: graphs compiled over a first generation (Dynamo's count), no recompiles over a second generation with other classes and seeds,
           tokens and patch counts equal eager (fp32); seconds of the first generation (compile
           included), of a compiled and of an eager generation. Then a second process on the
           same compile cache: its first generation's seconds and cache hits. break-even: how
           many generations the compile takes to pay back, (first - fast) / (eager - fast).
  train    the whole-model training step (GPT; DPAR with packed layouts) compiled as the trainer
           compiles it (compile_model, layouts moved by TrainBatch.to): graphs over the warm-up
           (one batch), no recompiles over later batches with new layouts and packed lengths, loss
           and gradients equal eager (fp32); then a second process on the same compile cache.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from utils.cli import HelpFormatter

V, CLASSES = 32, 5


def graphs() -> int:
    """Graphs Dynamo has compiled in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def cache_counters() -> Dict[str, int]:
    """Inductor's FX graph cache and the AOTAutograd cache: hits, misses, bypasses."""
    from torch._dynamo.utils import counters

    out = {k: v for k, v in counters["inductor"].items() if "cache" in k}
    out.update({k: v for k, v in counters["aot_autograd"].items() if "cache" in k})
    return out


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
SIZES = {  # name: (grid, gpt layers, dpar (E, P, D), heads, dim, batch)
    "tiny": (6, 2, (1, 1, 1), 4, 64, 4),
    "xs": (16, 4, (1, 2, 1), 6, 192, 8),
}


def gpt_model(size: str, **kwargs):
    from autoregressive.models.gpt import GPTConfig, Transformer

    grid, layers, _, heads, dim, _ = SIZES[size]
    torch.manual_seed(0)
    model = Transformer(GPTConfig(n_layer=layers, n_head=heads, dim=dim, vocab_size=V, block_size=grid * grid,
                                  num_classes=CLASSES, **kwargs))
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model


def dpar_model(size: str, **kwargs):
    from autoregressive.models.dpar import DPAR, DPARConfig

    grid, _, (e, p, d), heads, dim, _ = SIZES[size]
    torch.manual_seed(1)
    model = DPAR(DPARConfig(n_encoder_layer=e, n_patch_layer=p, n_decoder_layer=d, n_head=heads, dim=dim,
                            vocab_size=V, block_size=grid * grid, num_classes=CLASSES, **kwargs))
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model


def entropy_patching(size: str):
    """An unconditional GPT-T entropy model with varied entropies, and tau at their 60% quantile."""
    from autoregressive.models.gpt import GPT_models
    from entropy_model.entropy import teacher_forced_entropy
    from entropy_model.patching import PatchingConfig

    T = SIZES[size][0] ** 2
    torch.manual_seed(2)
    ent = GPT_models["GPT-T"](vocab_size=V, block_size=T, model_type="uncond").eval()
    torch.nn.init.normal_(ent.output.weight, std=2.0)
    torch.nn.init.normal_(ent.tok_embeddings.weight, std=1.0)
    codes = torch.randint(0, V, (16, T), generator=torch.Generator().manual_seed(5))
    tau = float(teacher_forced_entropy(ent, codes)[:, 1:].quantile(0.6))
    return ent, PatchingConfig("entropy", tau, 3, True)


# --------------------------------------------------------------------------------------
# Child measurements (one process each)
# --------------------------------------------------------------------------------------
def measure_decode(kind: str, size: str) -> dict:
    from autoregressive.models.generate import Decoding, generate

    grid, _, _, _, _, B = SIZES[size]
    T = grid * grid
    model = (gpt_model if kind == "gpt" else dpar_model)(size).eval()
    extra = {}
    if kind == "dpar":
        ent, patching = entropy_patching(size)
        extra = dict(entropy_model=ent, patching=patching)
    fast, eager = Decoding(compile=True, backend="inductor", keep_caches=True), Decoding()
    common = dict(cfg_scale=2.0, top_k=8, top_p=0.95, **extra)

    def run(decoding, seed: int):
        cond = torch.arange(B) % CLASSES
        start = time.perf_counter()
        out = generate(model, cond, T, row_seeds=[seed + i for i in range(B)], decoding=decoding, **common)
        return out, time.perf_counter() - start

    _, first = run(fast, 0)
    compiled_graphs, caches = graphs(), cache_counters()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled, fast_s = run(fast, 100)
        _, fast_again = run(fast, 200)
    reference, eager_s = run(eager, 100)
    _, eager_again = run(eager, 200)
    equal = torch.equal(compiled.tokens, reference.tokens)
    if kind == "dpar":
        equal = equal and torch.equal(compiled.num_patches, reference.num_patches)
    fast_s, eager_s = min(fast_s, fast_again), min(eager_s, eager_again)
    return dict(section="decode", model=kind, size=size, batch=B, tokens=T, graphs=compiled_graphs, recompiles=graphs() - compiled_graphs,
                equal_to_eager=equal, first_s=first, fast_s=fast_s, eager_s=eager_s, caches=caches,
                torch=torch.__version__)


def train_batch(seed: int, T: int, W: int, B: int = 4):
    from entropy_model.patching import patch_lengths_from_starts, patch_starts

    g = torch.Generator().manual_seed(seed)
    threshold = 3.0 + 5.0 * torch.rand((), generator=g).item()
    lengths = patch_lengths_from_starts(patch_starts(torch.rand(B, T, generator=g) * 10, threshold, 4, W))
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, CLASSES, (B,), generator=g), lengths


def loss_and_grads(model, codes, cond, *layout):
    model.zero_grad(set_to_none=True)
    _, loss = model(codes[:, :-1], cond, *layout, targets=codes)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def max_difference(a, b) -> float:
    assert a[1].keys() == b[1].keys()
    return max([float((a[0] - b[0]).abs())] + [float((a[1][n] - b[1][n]).abs().max()) for n in a[1]])


def measure_train(kind: str, size: str) -> dict:
    from autoregressive.models.dpar import build_patch_layout
    from autoregressive.train.data import TrainBatch
    from autoregressive.train.model import compile_model

    no_dropout = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    grid = SIZES[size][0]
    T = grid * grid
    build = gpt_model if kind == "gpt" else lambda s, **kw: dpar_model(s, pack_multiple=16, **kw)
    eager, compiled = build(size, **no_dropout).train(), build(size, **no_dropout).train()
    compile_model(compiled, "model", backend="inductor")  # as the trainer compiles

    def step(seed: int):
        codes, cond, lengths = train_batch(seed, T, grid)
        layout = ()
        if kind == "dpar":  # moved (and its sizes marked dynamic) as the trainer moves it
            layout = build_patch_layout(lengths, compiled.config, packed=True)
            layout = (TrainBatch({"patch_lengths": layout}, 0, 0).to(torch.device("cpu")).inputs["patch_lengths"],)
        start = time.perf_counter()
        out = loss_and_grads(compiled, codes, cond, *layout)
        seconds = time.perf_counter() - start
        return max_difference(out, loss_and_grads(eager, codes, cond, *layout)), seconds, layout

    seeds, warm, diffs, warm_s = iter(range(100)), set(), [], []
    diff, seconds, layout = step(next(seeds))  # the warm-up: one batch
    warm.add(layout[0].n_slots if layout else 0)
    diffs.append(diff)
    warm_s.append(seconds)
    warm_graphs, new_slots = graphs(), set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(6):
            diff, _, layout = step(next(seeds))
            diffs.append(diff)
            new_slots.add(layout[0].n_slots if layout else 0)
    return dict(section="train", model=kind, size=size, graphs=warm_graphs, recompiles=graphs() - warm_graphs,
                warmup_step_s=warm_s, new_packed_lengths=len(new_slots - warm), max_abs_difference=max(diffs),
                equal_to_eager=max(diffs) < 1e-4, caches=cache_counters(), torch=torch.__version__)


# --------------------------------------------------------------------------------------
# Parent: one child per measurement
# --------------------------------------------------------------------------------------
def child(section: str, kind: str, size: str, cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    cmd = [sys.executable, "-m", "benchmarks.compiler_check", "--child", section, kind, size]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        return dict(section=section, model=kind, size=size, error=tail[0], process_s=time.perf_counter() - start)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def plan(quick: bool) -> List[tuple]:
    if quick:
        return [("decode", "gpt", "tiny"), ("train", "gpt", "tiny")]
    return [("decode", "gpt", "tiny"), ("decode", "dpar", "tiny"), ("train", "gpt", "tiny"),
            ("train", "dpar", "tiny"), ("decode", "gpt", "xs"), ("decode", "dpar", "xs")]


def break_even(r: dict):
    gain = r["eager_s"] - r["fast_s"]
    return (r["first_s"] - r["fast_s"]) / gain if gain > 0 else None


def table(results: List[dict]) -> str:
    rows = ["| section | model | size | graphs | recompiles | == eager | first / second process s | fast s | eager s "
            "| break-even generations |", "|---" * 10 + "|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['section']} | {r['model']} | {r['size']} | error: {r['error']} |")
            continue
        if r["section"] == "decode":
            warm = r.get("second_process")
            second = f"{warm['first_s']:.1f}" if warm and "first_s" in warm else "-"
            be = break_even(r)
            rows.append(f"| decode | {r['model']} | {r['size']} (batch {r['batch']}, {r['tokens']} tokens) | "
                        f"{r['graphs']} | {r['recompiles']} | {r['equal_to_eager']} | {r['first_s']:.1f} / {second} | "
                        f"{r['fast_s']:.2f} | {r['eager_s']:.2f} | {'never' if be is None else f'{be:.0f}'} |")
        else:
            warm = r.get("second_process")
            second = f"{warm['warmup_step_s'][0]:.1f}" if warm and "warmup_step_s" in warm else "-"
            rows.append(f"| train | {r['model']} | {r['size']} | {r['graphs']} | {r['recompiles']} | "
                        f"{r['equal_to_eager']} ({r['max_abs_difference']:.1e}) | first step "
                        f"{r['warmup_step_s'][0]:.1f} / {second} | - | - | - |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Inductor on the CPU: graphs, recompiles, compiled == eager, the compile "
                                            "cache across processes and the compile break-even of decoding.",
                                formatter_class=HelpFormatter)
    p.add_argument("--out", default="results/compiler_check", help="folder for compiler_check.json")
    p.add_argument("--quick", action="store_true", help="GPT-T decode and training step only")
    p.add_argument("--child", nargs=3, metavar=("SECTION", "MODEL", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        section, kind, size = args.child
        torch.set_num_threads(1)
        result = (measure_decode if section == "decode" else measure_train)(kind, size)
        print(json.dumps(result))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as caches:
        for section, kind, size in plan(args.quick):
            cache = Path(caches) / f"{section}-{kind}-{size}"  # cold: an empty cache per measurement
            r = child(section, kind, size, cache)
            if "error" not in r:
                r["second_process"] = child(section, kind, size, cache)  # warm: the same cache
            results.append(r)
            print(json.dumps(r), flush=True)
    (out / "compiler_check.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    failed = [r for r in results if "error" in r or not r["equal_to_eager"] or r["recompiles"]]
    print(f"torch {torch.__version__}: {len(results) - len(failed)} of {len(results)} checks passed; "
          f"wrote {out / 'compiler_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
