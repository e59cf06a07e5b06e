"""Start-up at ImageNet size: a synthetic code store of ImageNet's size, and how long the
commands that open it take to start.

    nice -n 5 python -m benchmarks.imagenet_store_rehearsal --json rehearsal.json   # ~29.5 GB, deleted after
    python -m benchmarks.imagenet_store_rehearsal --images 2000                     # small check, a minute

The store: --images (1,281,167, ImageNet-1k's training set) x --views (10, ten-crop) x
grid^2 tokens (24 x 24 = 576, 384 px with a 16x tokenizer) of random uint16 codes below
--codebook-size (16384), labels 0..999, written as extract_codes.py writes it (codes.npy
hashed once by CodeStoreWriter.finalize into the manifest); random float16 entropies in
[0, ln V] with entropy.json as entropy_tools.score writes it (identity, float16 statistics,
entropy.npy's hash), for a real (tiny, unconditional GPT-T) entropy-model checkpoint, so that
train_c2i.py --entropy-model accepts them. Files are written in chunks, never held in memory.

Then, each in its own subprocess, timed from just before the process is started (so Python
and torch imports count) to a line it prints:
- train_c2i.py, DPAR (--dpar-model, default DPAR-T), --max-steps 2, batch 8, with
  --entropy-model: to the log line of step 1 (store, entropies and both hashes checked, model
  built, first batch read, one optimizer step), and to the "training ..." line before it;
- entropy_tools.score on a store whose scoring was interrupted with one slice of a few
  sequences left (entropy.progress.json and the done mask as the scorer leaves them): to the
  "resuming" line and to its first scored batch; then the whole run (which ends by counting
  statistics over, and hashing, all of entropy.npy), and a second run that finds it up to date;
- entropy_model.calibrate --target-compression: the whole run (it prints only at the end);
- the training DataLoader (autoregressive.train.data.BatchStream, batches of 32 with DPAR's
  patch layout built in the workers): to the first batch, then images/s over --read-batches
  more, with the default workers, with 0 workers (one core), and for codes and labels only,
  each over other images (a store larger than the page cache is read from disk), and the
  first read once more (the same pages, now cached: what the CPU alone allows).
`python -c "import torch"` is timed too: the floor every start-up includes.

The store lives in a temporary folder (under --dir, default the system's temporary folder) and
is deleted at the end, also after a failure, unless --keep. Timings share the CPU with whatever
else runs: the load average is recorded beside each one.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from autoregressive.models import build_config
from autoregressive.models.dpar import DPAR_models
from autoregressive.models.gpt import GPT_models
from autoregressive.train.data import MAX_DEFAULT_WORKERS, BatchStream, DPARBatches, GPTBatches
from dataset.code_store import CODES, LABELS, CodeDataset, CodeStoreWriter, open_code_store
from entropy_model.calibrate import load_entropies
from entropy_model.patching import paper_patching
from entropy_tools import score
from utils.checkpoint import save_checkpoint_atomic
from utils.cli import HelpFormatter, default_workers
from utils.distributed import DistInfo
from utils.identity import checkpoint_sha256, code_store_hash, record_file, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_IMAGES = 1281167
CHUNK_IMAGES = 4096  # images generated and written at a time (~47 MB of codes at 10 x 576)


# ---------------------------------------------------------------------------------------
# Writing the store
# ---------------------------------------------------------------------------------------
def _npy_for_writing(path: Path, dtype: type, shape: tuple[int, ...]) -> int:
    """Create path as a .npy of dtype and shape (sparse, zero) and return its data offset."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    offset = array.offset
    del array
    return offset


def _write_chunks(path: Path, dtype: type, shape: tuple[int, ...], make_chunk, desc: str) -> None:
    """Fill the .npy at path (N, ...) sequentially with make_chunk(start, stop) -> (stop - start, ...)."""
    offset = _npy_for_writing(path, dtype, shape)
    with open(path, "r+b") as f, tqdm(total=shape[0], desc=desc, unit="img", unit_scale=True, file=sys.stderr) as bar:
        f.seek(offset)
        for start in range(0, shape[0], CHUNK_IMAGES):
            stop = min(start + CHUNK_IMAGES, shape[0])
            chunk = make_chunk(start, stop)
            assert chunk.dtype == dtype and chunk.shape == (stop - start, *shape[1:])
            chunk.tofile(f)
            bar.update(stop - start)


def write_code_store(path: Path, images: int, views: int, grid: int, codebook_size: int, classes: int,
                     image_size: int, seed: int) -> dict:
    """A finalized code store of random codes; returns {"manifest", "write_s", "hash_s"}."""
    path.mkdir(parents=True, exist_ok=True)
    seq_len = grid * grid
    rng = np.random.default_rng(seed)
    started = time.monotonic()
    _write_chunks(path / CODES, np.uint16, (images, views, seq_len),
                  lambda a, b: rng.integers(0, codebook_size, size=(b - a, views, seq_len), dtype=np.uint16), "codes")
    labels = np.lib.format.open_memmap(path / LABELS, mode="w+", dtype=np.int64, shape=(images,))
    labels[:] = rng.integers(0, classes, size=images)
    labels.flush()
    del labels
    written = time.monotonic()
    manifest = {"image_size": image_size, "grid_height": grid, "grid_width": grid, "codebook_size": codebook_size,
                "num_views": views, "num_classes": classes, "tokenizer_hash": "synthetic", "tokenizer": "none (random codes)",
                "views": [f"view_{v}" for v in range(views)], "data_path": "synthetic", "source_count": images,
                "skipped": []}
    manifest = CodeStoreWriter.open(path).finalize(manifest)  # hashes codes.npy once, as extraction does
    return {"manifest": manifest, "write_s": written - started, "hash_s": time.monotonic() - written}


def write_entropy_model(path: Path, codebook_size: int, seq_len: int, seed: int) -> str:
    """A tiny unconditional GPT-T checkpoint, as train_c2i.py --unconditional saves one; its sha256."""
    torch.manual_seed(seed)
    model = GPT_models["GPT-T"](vocab_size=codebook_size, block_size=seq_len, model_type="uncond")
    save_checkpoint_atomic({"model": model.state_dict(),
                            "args": {"gpt_model": "GPT-T", "model_config": dataclasses.asdict(model.config)}}, path)
    return checkpoint_sha256(path)


def write_entropies(store: Path, model_path: Path, model_hash: str, seed: int) -> dict:
    """entropy.npy (N, views, T) float16, uniform in [0, ln V], and entropy.json as the scorer
    writes it; returns {"record", "write_s", "hash_s"}."""
    opened = open_code_store(store)
    shape = (len(opened), opened.num_views, opened.seq_len)
    max_entropy = math.log(opened.codebook_size)
    rng = np.random.default_rng(seed + 1)
    counts = np.zeros(score.FLOAT16_PATTERNS, dtype=np.int64)

    def chunk(a: int, b: int) -> np.ndarray:
        values = (rng.random((b - a, *shape[1:]), dtype=np.float32) * max_entropy).astype(np.float16)
        counts[:] += score.float16_value_counts(values)
        return values

    started = time.monotonic()
    _write_chunks(store / score.ENTROPY_FILE, np.float16, shape, chunk, "entropies")
    written = time.monotonic()
    record = {"entropy_model_hash": model_hash, "code_store_hash": code_store_hash(store), "count": shape[0],
              "num_views": shape[1], "T": shape[2], "mixed_precision": "none", "entropy_model": "GPT-T",
              "entropy_ckpt": model_path.name, "stats": score.entropy_statistics(counts, max_entropy),
              "entropy_file": record_file(store / score.ENTROPY_FILE), "complete": True}
    write_json_atomic(store / score.RECORD_FILE, record)
    return {"record": record, "write_s": written - started, "hash_s": time.monotonic() - written}


def last_slice_size(num_sequences: int, low: int = 1024, high: int = 65536) -> int:
    """A slice size in [low, high] that leaves the smallest non-empty last slice."""
    low = max(1, min(low, num_sequences // 2))
    candidates = [s for s in range(low, min(high, num_sequences - 1) + 1) if num_sequences % s]
    if not candidates:
        raise ValueError(f"no slice size in {low}..{high} leaves a partial last slice of {num_sequences}")
    return min(candidates, key=lambda s: (num_sequences % s, -s))


def interrupt_scoring(store: Path) -> dict:
    """Turn the finished scoring into an interrupted one: every slice done but the last (a few
    sequences), as entropy_tools.score leaves an interrupted run. Returns what was set up."""
    record = json.loads((store / score.RECORD_FILE).read_text())
    identity = {k: record[k] for k in ("entropy_model_hash", "code_store_hash", "count", "num_views", "T",
                                       "mixed_precision")}
    num_sequences = record["count"] * record["num_views"]
    slice_size = last_slice_size(num_sequences)
    num_slices = math.ceil(num_sequences / slice_size)
    (store / score.RECORD_FILE).unlink()
    os.replace(store / score.ENTROPY_FILE, store / score.PARTIAL_FILE)  # a run scores into the partial file
    done = np.lib.format.open_memmap(store / score.DONE_MASK_FILE, mode="w+", dtype=np.uint8, shape=(num_slices,))
    done[:-1] = 1
    done.flush()
    del done
    write_json_atomic(store / score.PROGRESS_FILE, {**identity, "slice_size": slice_size, "complete": False})
    return {"slice_size": slice_size, "slices": num_slices, "left": num_sequences - (num_slices - 1) * slice_size}


# ---------------------------------------------------------------------------------------
# Timing subprocesses
# ---------------------------------------------------------------------------------------
def load_average() -> float:
    return os.getloadavg()[0]


def timed_run(name: str, cmd: Sequence[str], marks: dict[str, str], timeout: float) -> dict:
    """Run cmd (stdout and stderr merged, lines split at newlines and carriage returns) and
    return seconds from just before the start to the first line matching each mark's regex,
    the total, the exit status and the load average before it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    load = load_average()
    found: dict[str, float] = {}
    lines: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def read() -> None:
        buffer = b""
        while block := proc.stdout.read1(1 << 16):
            buffer += block
            *complete, buffer = re.split(rb"[\r\n]", buffer)
            now = time.monotonic() - started
            for raw in complete:
                line = raw.decode(errors="replace")
                lines.append(line)
                for mark, pattern in marks.items():
                    if mark not in found and re.search(pattern, line):
                        found[mark] = now
        if buffer:
            lines.append(buffer.decode(errors="replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    total = time.monotonic() - started
    reader.join(timeout=10)
    result = {"name": name, "rc": rc, "total_s": round(total, 2), "load_before": round(load, 2),
              **{f"{m}_s": round(t, 2) for m, t in found.items()}, "missing_marks": sorted(set(marks) - set(found))}
    if rc != 0 or result["missing_marks"]:
        result["output_tail"] = "\n".join(line for line in lines if line.strip())[-3000:]
    print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in result.items() if k.endswith("_s") or k == "rc"),
          file=sys.stderr, flush=True)
    return result


def measure(store: Path, work: Path, model_path: Path, args: argparse.Namespace) -> list[dict]:
    py = sys.executable
    results = [timed_run("import torch", [py, "-c", "import torch"], {}, 300)]
    results.append(timed_run("train_c2i.py DPAR --max-steps 2", [
        py, "train_c2i.py", "--code-path", str(store), "--gpt-model", args.dpar_model, "--max-steps", "2",
        "--global-batch-size", "8", "--log-every", "1", "--entropy-model", str(model_path),
        "--threshold", repr(paper_patching(args.grid * 16).threshold),
        "--results-dir", str(work / "results"), "--run-name", "rehearsal"],
        {"training_line": r"^training ", "first_step": r"step\s+1/2"}, args.timeout))
    results.append(timed_run("entropy_model.calibrate --target-compression 2.06", [
        py, "-m", "entropy_model.calibrate", "--code-path", str(store), "--target-compression", "2.06"],
        {"report": r"compression .* tokens/patch"}, args.timeout))
    # each read draws other images (its own seed), so none finds pages an earlier one cached, but
    # the last, which repeats the first: the same reads from the page cache
    for label, extra in (("default workers", ["--read-seed", "1"]),
                         ("0 workers (one core)", ["--read-workers", "0", "--read-seed", "2"]),
                         ("default workers, codes and labels only", ["--read-plain", "--read-seed", "3"]),
                         ("default workers, the first read again (page cache)", ["--read-seed", "1"])):
        result = timed_run(f"DataLoader batches of 32, {label}", [
            py, "-m", "benchmarks.imagenet_store_rehearsal", "--read-store", str(store),
            "--read-batches", str(args.read_batches), *extra],
            {"first_batch": r"^first batch", "rates": r"^rates "}, args.timeout)
        result.update(_read_rates(result, work))
        results.append(result)
    setup = interrupt_scoring(store)
    resume = timed_run("entropy_tools.score (resume, one slice left)", [
        py, "-m", "entropy_tools.score", "--code-path", str(store), "--entropy-ckpt", str(model_path)],
        {"resuming_line": r"^resuming: ", "first_batch": r"\|\s*[1-9]\d*/\d+ \["}, args.timeout)
    resume.update(setup)
    results.append(resume)
    results.append(timed_run("entropy_tools.score (up to date)", [
        py, "-m", "entropy_tools.score", "--code-path", str(store), "--entropy-ckpt", str(model_path)],
        {"up_to_date": r"is up to date"}, args.timeout))
    return results


def _read_rates(result: dict, work: Path) -> dict:
    rates = work / "rates.json"
    if not rates.is_file():
        return {}
    out = json.loads(rates.read_text())
    rates.unlink()
    return out


# ---------------------------------------------------------------------------------------
# The DataLoader read (run in its own process by measure())
# ---------------------------------------------------------------------------------------
def read_store(path: Path, batches: int, workers: int | None, plain: bool, seed: int, out: Path) -> None:
    """Batches of 32 through the training stream; prints "first batch" and writes images/s."""
    store = open_code_store(path)
    entropies, _ = load_entropies(str(path), code_store_hash(path))
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    run = SimpleNamespace(global_batch_size=32, grad_accum_steps=1, seed=seed, num_workers=workers)
    if plain:
        builder, dataset = GPTBatches(store.codebook_size, 1000, 0.1), CodeDataset(store, seed=seed)
    else:
        config = build_config("DPAR-T", vocab_size=store.codebook_size, block_size=store.seq_len, num_classes=1000)
        patching = paper_patching(store.image_size)
        builder = DPARBatches(store.codebook_size, 1000, 0.1, patching, store.grid_width, config)
        dataset = CodeDataset(store, seed=seed, entropies=entropies)
    stream = BatchStream(dataset, builder, info, run)
    generator = torch.Generator().manual_seed(seed)
    stream.next_step(generator)
    print("first batch", flush=True)
    started = time.monotonic()
    for _ in range(batches):
        stream.next_step(generator)
    seconds = time.monotonic() - started
    used = default_workers(MAX_DEFAULT_WORKERS) if workers is None else workers
    rate = batches * 32 / seconds
    rates = {"workers": used, "images": batches * 32, "seconds": round(seconds, 2), "images_per_s": round(rate),
             "images_per_s_per_worker": round(rate / used) if used else None, "load_during": round(load_average(), 2)}
    write_json_atomic(out, rates)
    print(f"rates {json.dumps(rates)}", flush=True)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--images", type=int, default=IMAGENET_IMAGES, help="images in the store")
    p.add_argument("--views", type=int, default=10, help="views per image (10 = ten-crop)")
    p.add_argument("--grid", type=int, default=24, help="token grid side (24 = 384 px at 16x downsampling)")
    p.add_argument("--codebook-size", type=int, default=16384, help="codes are drawn below this")
    p.add_argument("--classes", type=int, default=1000, help="labels are drawn below this")
    p.add_argument("--dpar-model", default="DPAR-T", choices=list(DPAR_models), help="model train_c2i.py starts")
    p.add_argument("--read-batches", type=int, default=300, help="batches of 32 timed after the first")
    p.add_argument("--dir", default=None, help="parent folder of the temporary store (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the store (default: deleted, also after a failure)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random codes, labels and entropies")
    p.add_argument("--timeout", type=float, default=1800, help="seconds any one timed command may take")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--read-store", default=None, help=argparse.SUPPRESS)  # the DataLoader read, in its own process
    p.add_argument("--read-workers", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--read-plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--read-seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.images < 2 or args.views < 1 or args.grid < 1 or args.read_batches < 1:
        p.error("--images must be >= 2, --views, --grid and --read-batches >= 1")
    return args


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{platform.processor() or platform.machine()}, {cores} cores, {memory:.0f} GiB RAM, torch {torch.__version__}"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.read_store:
        store = Path(args.read_store)
        read_store(store, args.read_batches, args.read_workers, args.read_plain, args.read_seed,
                   store.parent / "rates.json")
        return
    work = Path(tempfile.mkdtemp(prefix="store-rehearsal-", dir=args.dir))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
              "store": {"images": args.images, "views": args.views, "tokens": args.grid ** 2}}
    try:
        store = work / "store"
        print(f"writing the store to {store}", file=sys.stderr)
        written = write_code_store(store, args.images, args.views, args.grid, args.codebook_size, args.classes,
                                   args.grid * 16, args.seed)
        model_path = work / "entropy_model.pt"
        model_hash = write_entropy_model(model_path, args.codebook_size, args.grid ** 2, args.seed)
        entropies = write_entropies(store, model_path, model_hash, args.seed)
        report["store"].update(
            codes_gb=round((store / CODES).stat().st_size / 1e9, 2),
            entropies_gb=round((store / score.ENTROPY_FILE).stat().st_size / 1e9, 2),
            codes_write_s=round(written["write_s"], 1), codes_hash_once_s=round(written["hash_s"], 1),
            entropies_write_s=round(entropies["write_s"], 1), entropies_hash_once_s=round(entropies["hash_s"], 1))
        print("timing start-ups", file=sys.stderr)
        report["runs"] = measure(store, work, model_path, args)
        report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
            print(f"deleted {work}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    failed = [r["name"] for r in report["runs"] if r["rc"] != 0 or r["missing_marks"]]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
