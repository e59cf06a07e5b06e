"""Score a code store with the entropy model: e_t in nats for every token of every stored view.

    python -m entropy_tools.score --code-path STORE --entropy-ckpt entropy.pt [--batch-size 64]
    torchrun --nproc_per_node 8 -m entropy_tools.score --code-path STORE --entropy-ckpt entropy.pt

Writes beside the codes (or into --entropy-path):
    entropy.npy   (N, views, T) float16; entropy[n, v, t] = H(p(x_t | x_<t)) for view v of image n
    entropy.json  {"entropy_model_hash", "code_store_hash", "count", "num_views", "T", "stats",
                  "entropy_file": {"sha256", "stat"}, "complete": true, ...}, written atomically
                  once every entropy is on disk; entropy.npy is hashed once, then.
Readers (entropy_model.calibrate.load_entropies) refuse entropies whose hashes do not match, and
an entropy.npy whose size, mtime or (on request) content no longer fits its record.
The code store's identity is cheap (utils.identity.code_store_hash); --verify-store
re-hashes its codes first.

One teacher-forced pass per batch of sequences (the N * views views, flattened); entropies are
computed in float32 from the logits whatever the autocast dtype, then stored as float16.

Never rewritten under a reader: a run scores into entropy.partial.npy (its blocks reserved when
it is created, so a full disk stops the run there with one line), and only when every entropy is
in it, fsynced and hashed, renames it over entropy.npy (a new file: a process that memory-mapped
the old entropy.npy keeps reading the old values) and then writes entropy.json. Until then the
old entropy.npy and entropy.json stay as they were. Between the two renames the pair does not
match; readers refuse it (the record's size and mtime, then its hash, do not fit the file), and a
run killed there scores again from the start when rerun.

Resuming: the flattened sequences are scored in slices of --slice-size. At the start the
run's identity (hashes, shape, precision) goes to entropy.progress.json and a one-byte-per-
slice done mask to entropy.progress.npy; a slice's byte is set only after its entropies are
flushed. A rerun with the same checkpoint, store and precision scores only the unfinished
slices (an interrupt says so in one line); anything else starts over. Under torchrun the ranks
share the unfinished slices and write disjoint parts of entropy.partial.npy.

Non-finite entropies (NaN or inf, from a broken checkpoint or an overflow) stop the run with one
line naming the checkpoint; nothing is published.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from autoregressive.models import model_family, model_from_checkpoint
from dataset.code_store import CodeStore, check_code_store, open_code_store
from entropy_model.entropy import entropy_from_logits
from utils.cli import HelpFormatter
from utils.disk_space import preallocate, reporting_no_space
from utils.distributed import all_reduce, barrier, broadcast_object, init_distributed, teardown_distributed
from utils.identity import checkpoint_sha256, code_store_hash, record_file, write_json_atomic

ENTROPY_FILE = "entropy.npy"
RECORD_FILE = "entropy.json"
PARTIAL_FILE = "entropy.partial.npy"  # the entropies being scored, renamed to ENTROPY_FILE when complete
PROGRESS_FILE = "entropy.progress.json"
DONE_MASK_FILE = "entropy.progress.npy"
AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16}
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
HISTOGRAM_BINS = 50
FLOAT16_PATTERNS = 1 << 16


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
def load_entropy_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(unconditional GPT in eval mode, its stored args) from a project checkpoint (file or FSDP
    directory); ValueError (one line) for anything else."""
    model, args = model_from_checkpoint(path)
    if model_family(model).patched:
        raise ValueError(f"{path} holds a {model_family(model).name} model; the entropy model is an unconditional GPT")
    if model.config.model_type != "uncond":
        raise ValueError(f"{path} holds a class-conditional GPT; the entropy model must be unconditional "
                         f"(train it with --unconditional)")
    return model, args


def check_model_fits_store(model: torch.nn.Module, store: CodeStore) -> None:
    """ValueError (one line) unless the store's codebook and token grid are the model's."""
    check_code_store(store, codebook_size=model.config.vocab_size, grid=model.config.grid_size)


def score_batch(model: torch.nn.Module, codes: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """codes (B, T) int64 -> entropies (B, T) float32 in nats, e_t of p(x_t | x_<t).

    The forward pass may run under autocast; the log-softmax always runs in float32."""
    with torch.inference_mode():
        with torch.autocast(codes.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(codes[:, :-1], None)  # (B, T, V)
        return entropy_from_logits(logits)  # (B, T) float32


# ---------------------------------------------------------------------------------------
# Statistics (exact: float16 has 65536 values, so counting them gives every quantile)
# ---------------------------------------------------------------------------------------
def float16_value_counts(values: np.ndarray) -> np.ndarray:
    """(65536,) int64 count of each float16 bit pattern in values (any shape, float16)."""
    bits = np.ascontiguousarray(values, dtype=np.float16).view(np.uint16).ravel()
    return np.bincount(bits, minlength=FLOAT16_PATTERNS).astype(np.int64)


def entropy_statistics(counts: np.ndarray, max_entropy: float, num_bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Mean, std, min, max, quantiles (smallest stored value whose CDF reaches q, numpy's
    "inverted_cdf") and a histogram over [0, max_entropy] from float16 value counts (65536,).
    Values outside the range fall into the end bins."""
    values = np.arange(FLOAT16_PATTERNS, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
    if counts[~np.isfinite(values)].any():
        raise ValueError("entropies contain NaN or infinite values")
    present = np.flatnonzero(counts)
    order = np.argsort(values[present])
    v, c = values[present][order], counts[present][order]  # (K,) sorted distinct values, their counts
    total = int(c.sum())
    if total == 0:
        raise ValueError("no entropies to summarise")
    mean = float((v * c).sum() / total)
    cumulative = np.cumsum(c)
    quantiles = {str(q): float(v[np.searchsorted(cumulative, total * q, side="left")]) for q in QUANTILES}
    edges = np.linspace(0.0, max_entropy, num_bins + 1)
    bins = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, num_bins - 1)  # (K,)
    return {
        "num_values": total,
        "mean": mean,
        "std": float(math.sqrt((c * (v - mean) ** 2).sum() / total)),
        "min": float(v[0]),
        "max": float(v[-1]),
        "quantiles": quantiles,
        "histogram": {"bins": edges.tolist(), "counts": np.bincount(bins, weights=c, minlength=num_bins)
                      .astype(np.int64).tolist()},
    }


# ---------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _entropy_file_fits(path: Path, shape: tuple[int, int, int]) -> bool:
    try:
        entropy = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return entropy.dtype == np.float16 and entropy.shape == shape


def _same_run(record: dict[str, Any] | None, identity: dict[str, Any]) -> bool:
    return record is not None and all(record.get(k) == v for k, v in identity.items())


def prepare_output(out: Path, identity: dict[str, Any], shape: tuple[int, int, int], slice_size: int) -> str:
    """Resume, start over or skip (rank 0 only). Returns "complete" when a finished record of
    this run exists, "resume" when unfinished slices of this run can continue, else creates
    empty progress files and entropy.partial.npy and returns "start". entropy.npy and
    entropy.json are left as they are (publish() replaces them)."""
    if _same_run(_read_json(out / RECORD_FILE), {**identity, "complete": True}) and \
            _entropy_file_fits(out / ENTROPY_FILE, shape):
        for name in (PROGRESS_FILE, DONE_MASK_FILE, PARTIAL_FILE):  # left behind by a run killed after its record
            (out / name).unlink(missing_ok=True)
        return "complete"
    progress = _read_json(out / PROGRESS_FILE)
    if _same_run(progress, identity) and _entropy_file_fits(out / PARTIAL_FILE, shape):
        num_slices = math.ceil(shape[0] * shape[1] / progress["slice_size"])
        try:
            if np.load(out / DONE_MASK_FILE, mmap_mode="r").shape == (num_slices,):
                return "resume"
        except (OSError, ValueError):
            pass
    # Start over in entropy.partial.npy; the published entropy.npy / entropy.json stay readable.
    out.mkdir(parents=True, exist_ok=True)
    for name in (PROGRESS_FILE, PARTIAL_FILE):
        (out / name).unlink(missing_ok=True)
    nbytes = int(np.prod(shape)) * 2
    with reporting_no_space(out / PARTIAL_FILE, nbytes):
        np.lib.format.open_memmap(out / PARTIAL_FILE, mode="w+", dtype=np.float16, shape=shape).flush()
        preallocate(out / PARTIAL_FILE)
    mask = np.lib.format.open_memmap(out / DONE_MASK_FILE, mode="w+", dtype=np.uint8,
                                     shape=(math.ceil(shape[0] * shape[1] / slice_size),))
    mask.flush()
    write_json_atomic(out / PROGRESS_FILE, {**identity, "slice_size": slice_size, "complete": False})
    return "start"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(out: Path, record: dict[str, Any]) -> None:
    """Switch the finished entropy.partial.npy in as entropy.npy (a rename: a new inode, so
    readers that mapped the old file keep its data), then write its record entropy.json and
    drop the progress files. record["entropy_file"] must describe entropy.partial.npy (a rename
    keeps its size and mtime)."""
    with reporting_no_space(out / ENTROPY_FILE, 1 << 16):
        os.replace(out / PARTIAL_FILE, out / ENTROPY_FILE)
        _fsync(out)
        write_json_atomic(out / RECORD_FILE, record)
        _fsync(out)
    for name in (PROGRESS_FILE, DONE_MASK_FILE):
        (out / name).unlink(missing_ok=True)


def _read_sequences(codes: Any, start: int, stop: int, num_views: int, seq_len: int) -> np.ndarray:
    """Flattened sequences [start, stop) of codes (N, views, T) -> (stop - start, T) int64."""
    first, last = start // num_views, (stop - 1) // num_views + 1
    block = np.asarray(codes[first:last]).reshape(-1, seq_len)  # ((last - first) * views, T)
    offset = first * num_views
    return block[start - offset: stop - offset].astype(np.int64)


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------
def score_slices(
    model: torch.nn.Module,
    store: CodeStore,
    out: Path,
    slices: Sequence[int],
    slice_size: int,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
    progress: bool,
    model_name: str = "the entropy model",
) -> int:
    """Score the given slices into out/entropy.partial.npy, marking each done after its flush.
    Returns the number of batches run. ValueError (one line naming model_name) on NaN or inf."""
    device = next(model.parameters()).device
    num_sequences, seq_len = len(store) * store.num_views, store.seq_len
    entropy = np.load(out / PARTIAL_FILE, mmap_mode="r+").reshape(num_sequences, seq_len)  # (N * views, T)
    done = np.load(out / DONE_MASK_FILE, mmap_mode="r+")  # (num_slices,) uint8
    vocab = model.config.vocab_size
    total = sum(min(slice_size, num_sequences - s * slice_size) for s in slices)
    batches = 0
    with tqdm(total=total, desc="entropy", unit="seq", disable=not progress, file=sys.stderr) as bar:
        for s in slices:
            slice_start, slice_stop = s * slice_size, min((s + 1) * slice_size, num_sequences)
            for start in range(slice_start, slice_stop, batch_size):
                stop = min(start + batch_size, slice_stop)
                codes = _read_sequences(store.codes, start, stop, store.num_views, seq_len)  # (B, T)
                if codes.min() < 0 or codes.max() >= vocab:
                    raise ValueError(f"code store holds codes outside 0..{vocab - 1} (sequences {start}..{stop - 1})")
                e = score_batch(model, torch.from_numpy(codes).to(device), autocast_dtype)  # (B, T) float32
                if not bool(torch.isfinite(e).all()):
                    raise ValueError(f"entropy model {model_name} gives NaN or infinite entropies ("
                                     f"{int((~torch.isfinite(e)).sum())} in sequences {start}..{stop - 1} of "
                                     f"{store.path}); nothing was published: check or replace that checkpoint")
                entropy[start:stop] = e.to(torch.float16).cpu().numpy()
                batches += 1
                bar.update(stop - start)
            entropy.flush()  # the slice's data is on disk before its done mark
            done[s] = 1
            done.flush()
    return batches


def count_stored_values(out: Path, rank: int, world_size: int, chunk: int = 1 << 16) -> np.ndarray:
    """float16 value counts (65536,) of this rank's share of out/entropy.partial.npy's sequences."""
    entropy = np.load(out / PARTIAL_FILE, mmap_mode="r")
    flat = entropy.reshape(-1, entropy.shape[-1])  # (N * views, T)
    lo, hi = rank * len(flat) // world_size, (rank + 1) * len(flat) // world_size
    counts = np.zeros(FLOAT16_PATTERNS, dtype=np.int64)
    for start in range(lo, hi, chunk):
        counts += float16_value_counts(flat[start:min(start + chunk, hi)])
    return counts


def score_code_store(
    code_path: str | Path,
    model: torch.nn.Module,
    model_hash: str,
    entropy_path: str | Path | None = None,
    batch_size: int = 64,
    slice_size: int = 4096,
    mixed_precision: str = "none",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    extra_record: dict[str, Any] | None = None,
    verify_store: bool = False,
    model_name: str = "the entropy model",
) -> dict[str, Any]:
    """Score every stored view of the code store at code_path with the entropy model (already
    on its device) and write entropy.npy / entropy.json into entropy_path (default: the store),
    replacing earlier ones only when every entropy is scored (publish()).

    Every rank of a torchrun job calls this with its rank and the world size. Returns the
    final record, as written to entropy.json, plus "batches_run" (this rank's) and
    "up_to_date" (True when a finished record of this run already existed: nothing was scored).
    verify_store: re-hash the codes instead of trusting their recorded size and mtime.
    model_name: how errors name the model (its checkpoint path)."""
    if batch_size < 1 or slice_size < 1:
        raise ValueError("batch size and slice size must be >= 1")
    if mixed_precision not in AUTOCAST_DTYPES:
        raise ValueError(f"mixed precision must be one of {sorted(AUTOCAST_DTYPES)}, got {mixed_precision!r}")
    store = open_code_store(code_path, codebook_size=model.config.vocab_size)
    check_model_fits_store(model, store)
    out = Path(entropy_path or code_path)
    shape = (len(store), store.num_views, store.seq_len)
    plan = None
    if rank == 0:  # one rank hashes and prepares the files; all follow its plan
        identity = {"entropy_model_hash": model_hash, "code_store_hash": code_store_hash(code_path, verify_store),
                    "count": shape[0], "num_views": shape[1], "T": shape[2], "mixed_precision": mixed_precision}
        state = prepare_output(out, identity, shape, slice_size)
        todo = np.zeros(0, dtype=np.int64)
        if state != "complete":
            slice_size = _read_json(out / PROGRESS_FILE)["slice_size"]
            todo = np.flatnonzero(np.load(out / DONE_MASK_FILE) == 0)  # unfinished slices
        plan = (state, identity, slice_size, todo)
    state, identity, slice_size, todo = broadcast_object(plan)
    if state == "complete":
        return {**_read_json(out / RECORD_FILE), "batches_run": 0, "up_to_date": True}
    if progress and state == "resume":
        print(f"resuming: {len(todo)} of {math.ceil(shape[0] * shape[1] / slice_size)} slices left")

    mine = todo[rank::world_size].tolist()
    batches = score_slices(model, store, out, mine, slice_size, batch_size, AUTOCAST_DTYPES[mixed_precision],
                           progress and rank == 0, model_name)
    barrier()  # every slice is on disk
    device = next(model.parameters()).device  # NCCL reduces device tensors
    counts = all_reduce(torch.from_numpy(count_stored_values(out, rank, world_size)).to(device)).cpu().numpy()
    record = None
    if rank == 0:
        unfinished = int((np.load(out / DONE_MASK_FILE) == 0).sum())
        if unfinished:
            raise RuntimeError(f"{unfinished} slices of {out / PARTIAL_FILE} were not scored")
        stats = entropy_statistics(counts, math.log(model.config.vocab_size))
        _fsync(out / PARTIAL_FILE)
        record = {**identity, **(extra_record or {}), "stats": stats, "entropy_file": record_file(out / PARTIAL_FILE),
                  "finite": True, "complete": True}
        publish(out, record)
    record = broadcast_object(record)
    return {**record, "batches_run": batches, "up_to_date": False}


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def interrupted_progress(out: Path) -> str:
    """One line for an interrupted run: what is kept and that a rerun continues."""
    try:
        done = np.load(out / DONE_MASK_FILE)
    except (OSError, ValueError):
        return f"no entropies of this run were kept in {out}; rerun the same command to score them"
    return (f"{int(done.sum())} of {len(done)} slices are scored and kept in {out / PARTIAL_FILE} (any earlier "
            f"entropy.npy is untouched); rerun the same command to continue")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Score a code store with the entropy model "
                                                 "(writes entropy.npy and entropy.json).",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--code-path", required=True, help="code store directory")
    parser.add_argument("--entropy-ckpt", required=True, help="entropy model checkpoint (unconditional GPT)")
    parser.add_argument("--entropy-path", default=None, help="output directory (default: the code store)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass, per rank")
    parser.add_argument("--slice-size", type=int, default=4096,
                        help="sequences per resumable slice (a resumed run keeps the first run's)")
    parser.add_argument("--mixed-precision", choices=list(AUTOCAST_DTYPES), default="none",
                        help="autocast dtype of the forward pass; entropies are always computed in float32")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when available")
    parser.add_argument("--verify-store", action="store_true",
                        help="re-hash codes.npy against its manifest instead of checking its size and mtime")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.slice_size < 1:
        parser.error("--batch-size and --slice-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        info = init_distributed(args.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    try:
        model, model_args = load_entropy_model(args.entropy_ckpt)
        model.to(info.device)
        model_hash = broadcast_object(checkpoint_sha256(args.entropy_ckpt) if info.is_main else None)
        started = time.time()
        record = score_code_store(
            args.code_path, model, model_hash, args.entropy_path, args.batch_size, args.slice_size,
            args.mixed_precision, info.rank, info.world_size, progress=info.is_main,
            extra_record={"entropy_model": model_args["gpt_model"], "entropy_ckpt": Path(args.entropy_ckpt).name},
            verify_store=args.verify_store, model_name=args.entropy_ckpt,
        )
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted_progress(Path(args.entropy_path or args.code_path))}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        teardown_distributed()
    if info.is_main:
        path = Path(args.entropy_path or args.code_path) / ENTROPY_FILE
        stats = record["stats"]
        done = "is up to date" if record["up_to_date"] else f"written in {time.time() - started:.1f}s"
        print(f"{path} ({record['count']} images x {record['num_views']} views x {record['T']} tokens) {done}; "
              f"mean entropy {stats['mean']:.3f} nats (std {stats['std']:.3f}, median {stats['quantiles']['0.5']:.3f})")


if __name__ == "__main__":
    main()
