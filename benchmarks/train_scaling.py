"""Training throughput of train_c2i.py on CPU: one process vs two torchrun processes (DDP, gloo).

    python -m benchmarks.train_scaling                       # GPT-XS, 256 tokens per image
    python -m benchmarks.train_scaling --gpt-model GPT-T --steps 20 --out bench.json

Every configuration trains the same model on the same global batch of a synthetic code
store; tokens/s is measured over the steps after --warmup from train_c2i.py's own per-step
log. Configurations: one process with all cores as threads, one process with half of them,
and two processes with half each. Prints a table and writes the numbers as JSON.
"""
import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def make_store(path: Path, count: int, grid: int, vocab: int, classes: int = 10) -> None:
    """A code store (manifest.json, codes.npy (N, 1, T) uint16, labels.npy) of uniformly random
    codes: throughput does not depend on their content."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    np.save(path / "codes.npy", rng.integers(0, vocab, (count, 1, grid * grid)).astype(np.uint16))
    np.save(path / "labels.npy", rng.integers(0, classes, count).astype(np.int64))
    manifest = {"image_size": grid * 16, "grid_height": grid, "grid_width": grid, "codebook_size": vocab,
                "num_views": 1, "count": count, "tokenizer_hash": "benchmark", "num_classes": classes,
                "format_version": 1}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, store: Path, results: Path, procs: int, threads: int) -> dict:
    """Train --steps steps with `procs` processes of `threads` threads; tokens/s after warmup."""
    name = f"p{procs}-t{threads}"
    train = ["train_c2i.py", "--code-path", str(store), "--results-dir", str(results), "--run-name", name,
             "--gpt-model", args.gpt_model, "--global-batch-size", str(args.global_batch_size),
             "--max-steps", str(args.steps), "--log-every", "1", "--ckpt-every", str(10 * args.steps),
             "--num-workers", "0", "--device", "cpu"]
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(launcher + train, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {name} failed:\n{proc.stderr[-2000:]}")
    log = [json.loads(line) for line in (results / name / "log.jsonl").read_text().splitlines()]
    timed = [r for r in log if r["step"] > args.warmup]
    seconds = sum(1 / r["steps_per_s"] for r in timed)
    tokens = sum(r["tokens_per_s"] / r["steps_per_s"] for r in timed)
    return {"processes": procs, "threads_per_process": threads, "steps_timed": len(timed),
            "tokens_per_s": tokens / seconds, "steps_per_s": len(timed) / seconds,
            "final_loss": log[-1]["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpt-model", default="GPT-XS", help="registry name of the model to train")
    p.add_argument("--image-size", type=int, default=256, help="256 -> 16x16 = 256 tokens (downsample 16)")
    p.add_argument("--vocab-size", type=int, default=16384, help="codebook size (VQ-16: 16384)")
    p.add_argument("--global-batch-size", type=int, default=16, help="images per step over all processes")
    p.add_argument("--steps", type=int, default=12, help="steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores to use")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per configuration, in alternating order; the table shows the fastest")
    p.add_argument("--out", default="train_scaling.json", help="JSON output")
    args = p.parse_args()
    if args.steps <= args.warmup or args.global_batch_size % 2 or args.cores < 2:
        raise SystemExit("error: need --steps > --warmup, an even --global-batch-size and at least 2 cores")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "codes"
        make_store(store, 4 * args.global_batch_size, args.image_size // 16, args.vocab_size)
        configs = [(1, args.cores), (1, args.cores // 2), (2, args.cores // 2)]
        runs = {c: [] for c in configs}
        for rep in range(args.repeats):
            for procs, threads in configs[:: 1 if rep % 2 == 0 else -1]:
                results = Path(tmp) / f"results{rep}"
                runs[(procs, threads)].append(run(args, store, results, procs, threads))
    rows = [max(runs[c], key=lambda r: r["tokens_per_s"]) for c in configs]
    base = rows[0]["tokens_per_s"]
    print(f"{args.gpt_model}, {(args.image_size // 16) ** 2} tokens/image, global batch {args.global_batch_size}, "
          f"{args.steps - args.warmup} timed steps, fastest of {args.repeats}, {args.cores} cores "
          f"({platform.processor() or platform.machine()})")
    print(f"{'processes':>9} | {'threads/proc':>12} | {'tokens/s':>9} | {'steps/s':>7} | speed-up")
    for r in rows:
        print(f"{r['processes']:>9} | {r['threads_per_process']:>12} | {r['tokens_per_s']:>9,.0f} | "
              f"{r['steps_per_s']:>7.3f} | {r['tokens_per_s'] / base:.2f}x")
    record = {"config": vars(args), "torch": torch.__version__, "fastest": rows,
              "all_runs": [r for c in configs for r in runs[c]]}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
