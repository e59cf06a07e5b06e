"""Threshold calibration: pick tau so that patching reaches a target token compression.

Compression = tokens / patches over a sample of images (mean tokens per patch). Raising
tau removes entropy gates, which only merges segments, so compression is non-decreasing
in tau; it changes only where tau crosses a gate score (a quantized entropy, or a
difference of two in mode "relative"), and bisection over the sorted distinct gate scores
finds the closest achievable compression exactly.

Also reads stored entropies, as entropy_tools/score.py writes them: `<code store>/entropy.npy`
(N, views, T) float16 with `<code store>/entropy.json` {"entropy_model_hash",
"code_store_hash", "count", "stats", "entropy_file", ...}; `load_entropies` refuses entropies
made for other codes or by another entropy model, and an entropy.npy changed after scoring
(its size and mtime against the record, or on request its content; utils.identity).
Every reader (`read_entropy_file`, so calibration, statistics and training too) refuses an
entropy.npy holding NaN or infinite values, in one line naming the file and their count
(check_entropies_finite: a chunked scan of the float16 bits). The scan is skipped when the record
vouches for the file: it says "finite" (the scorer refuses non-finite entropies before it
publishes), and the file still has the size and mtime recorded when it was hashed.

    python -m entropy_model.calibrate --code-path STORE --target-compression 1.81
    python -m entropy_model.calibrate --code-path STORE --threshold 7.8 --json calib.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from entropy_model.patching import (
    GATED_MODES,
    PAPER_THRESHOLDS,
    PATCH_MODES,
    gate_scores,
    patch_lengths_from_starts,
    patch_starts,
)
from utils.cli import HelpFormatter
from utils.identity import check_entropy_record, file_stat

PAPER_THRESHOLD = PAPER_THRESHOLDS[256]  # the paper's tau at 256 px (its entropy model only)
QUANTILE_LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
FLOAT16_EXPONENT = 0x7C00  # float16 bits of an all-ones exponent: inf or NaN
FINITE_SCAN_VALUES = 1 << 24  # entropies read per step of the scan


def count_non_finite(entropy: np.ndarray, chunk: int = FINITE_SCAN_VALUES) -> tuple[int, int | None]:
    """(number of NaN or infinite values, flat index of the first or None) of float16 entropies
    of any shape, read in chunks (a memory-mapped file is never loaded whole)."""
    flat = entropy.reshape(-1).view(np.uint16)  # (N * views * T,) the float16 bits
    count, first = 0, None
    for start in range(0, flat.size, chunk):
        bad = (flat[start:start + chunk] & FLOAT16_EXPONENT) == FLOAT16_EXPONENT
        n = int(np.count_nonzero(bad))
        if n and first is None:
            first = start + int(np.flatnonzero(bad)[0])
        count += n
    return count, first


def check_entropies_finite(entropy: np.ndarray, path: str) -> None:
    """ValueError (one line naming path and the count) when entropies (N, views, T) float16
    hold NaN or infinite values: a patch rule compares entropies with a threshold, and NaN
    compares false, so such entropies silently change the patches."""
    count, first = count_non_finite(entropy)
    if count:
        image, view, token = np.unravel_index(first, entropy.shape)
        raise ValueError(f"{path} holds {count} NaN or infinite entropies (the first at image {image}, view {view}, "
                         f"token {token}); rescore the code store with python -m entropy_tools.score")


def read_entropy_file(code_store_path: str, check_finite: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Memory-mapped entropies (N, views, T) float16 and their JSON record, without hash checks;
    ValueError (one line) for an unfinished record, a shape that does not fit it, or (unless
    check_finite is False) NaN or infinite entropies (scanned for unless the record vouches for
    the file: see the module docstring)."""
    npy_path = os.path.join(code_store_path, "entropy.npy")
    json_path = os.path.join(code_store_path, "entropy.json")
    for path in (npy_path, json_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no entropies at {path}; score the code store with the entropy model first")
    with open(json_path) as f:
        info = json.load(f)
    entropy = np.load(npy_path, mmap_mode="r")
    if entropy.ndim != 3 or entropy.dtype != np.float16:
        raise ValueError(f"{npy_path} must hold (N, views, T) float16, got {entropy.shape} {entropy.dtype}")
    if info.get("complete") is False:
        raise ValueError(f"{json_path} records an unfinished scoring run; rerun python -m entropy_tools.score")
    if "count" in info and int(info["count"]) != entropy.shape[0]:
        raise ValueError(f"{json_path} records {info['count']} images but {npy_path} holds {entropy.shape[0]}")
    if "num_views" in info and "T" in info and (int(info["num_views"]), int(info["T"])) != entropy.shape[1:]:
        raise ValueError(f"{json_path} records {info['num_views']} views of {info['T']} tokens but {npy_path} "
                         f"holds {entropy.shape[1:]}")
    if check_finite and not _written_by_scorer(npy_path, info):
        check_entropies_finite(entropy, npy_path)
    return entropy, info


def _written_by_scorer(npy_path: str, info: dict[str, Any]) -> bool:
    """True when the record says the values are finite (the scorer checked them) and holds
    entropy.npy's stat from when the scorer hashed it, and the file still has that size and
    mtime: then it holds what the scorer wrote."""
    recorded = info.get("entropy_file")
    return (info.get("finite") is True and isinstance(recorded, dict)
            and recorded.get("stat") == file_stat(npy_path))


def load_entropies(
    code_store_path: str,
    expected_code_store_hash: str,
    expected_entropy_model_hash: str | None = None,
    verify: bool = False,
    check_finite: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Memory-mapped entropies (N, views, T) float16 and their JSON record, refusing
    (ValueError) NaN or infinite entropies (unless check_finite is False) and entropies that
    utils.identity.check_entropy_record refuses: made for other codes or, when a hash is given,
    by another model, or an entropy.npy changed since it was scored (verify: its sha256)."""
    entropy, info = read_entropy_file(code_store_path, check_finite)
    info = check_entropy_record(code_store_path, info, expected_code_store_hash, expected_entropy_model_hash, verify)
    return entropy, info


def store_grid_width(code_store_path: str, num_tokens: int) -> int:
    """Grid width of a code store: manifest.json "grid_width", else a square grid of num_tokens."""
    manifest_path = os.path.join(code_store_path, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        width, height = int(manifest["grid_width"]), int(manifest["grid_height"])
        if width * height != num_tokens:
            raise ValueError(f"{manifest_path} grid {height}x{width} does not match {num_tokens} tokens per image")
        return width
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{code_store_path} has no manifest and {num_tokens} tokens is not a square grid")
    return side


def sample_entropies(entropy: np.ndarray, sample: int | None, seed: int = 0) -> torch.Tensor:
    """Up to `sample` random (image, view) rows of stored entropies (N, views, T) -> (S, T) float32."""
    flat = entropy.reshape(-1, entropy.shape[-1])  # (N * views, T)
    if sample is not None and sample < flat.shape[0]:
        rows = np.sort(np.random.default_rng(seed).choice(flat.shape[0], size=sample, replace=False))
        flat = flat[rows]
    return torch.from_numpy(np.array(flat, dtype=np.float32))


def _iter_starts(
    entropies: torch.Tensor,
    threshold: float | None,
    max_patch_length: int | None,
    row_width: int | None,
    mode: str,
    chunk_rows: int = 4096,
) -> Iterator[torch.Tensor]:
    for chunk in entropies.split(chunk_rows):
        yield patch_starts(chunk, threshold, max_patch_length, row_width, mode)


def compression_for_threshold(
    entropies: torch.Tensor,
    threshold: float | None,
    max_patch_length: int | None = None,
    row_width: int | None = None,
    mode: str = "entropy",
) -> float:
    """Tokens per patch (total tokens / total patches) over entropies (N, T) for threshold tau."""
    patches = sum(int(s.sum()) for s in _iter_starts(entropies, threshold, max_patch_length, row_width, mode))
    return entropies.numel() / patches


def threshold_for_compression(
    entropies: torch.Tensor,
    target_compression: float,
    max_patch_length: int | None = None,
    row_width: int | None = None,
    mode: str = "entropy",
) -> tuple[float, float]:
    """Threshold tau whose compression over entropies (N, T) is closest to the target.

    Returns (tau, achieved compression). Bisection runs over the sorted distinct gate
    scores c_0 < ... < c_{K-1}: any tau in [c_k, c_{k+1}) gives the same patches, and the
    returned tau lies in that interval (their midpoint when float32 holds it, else c_k).
    """
    if target_compression < 1:
        raise ValueError(f"target compression must be >= 1 (tokens per patch), got {target_compression}")
    scores = torch.unique(gate_scores(entropies, mode))  # (K,) sorted
    scores = scores[torch.isfinite(scores)].double()
    if scores.numel() == 0:
        raise ValueError("no finite entropies to calibrate on")

    def tau_at(k: int) -> float:
        """A threshold in bucket k: k = -1 gates every score, k = K-1 gates none."""
        if k < 0:
            return float(scores[0]) - 1.0
        if k == scores.numel() - 1:
            return float(scores[k])
        lo, hi = float(scores[k]), float(scores[k + 1])
        mid = float(np.float32((lo + hi) / 2))
        return mid if lo <= mid < hi else lo

    cache: dict[int, float] = {}

    def compression_at(k: int) -> float:
        if k not in cache:
            cache[k] = compression_for_threshold(entropies, tau_at(k), max_patch_length, row_width, mode)
        return cache[k]

    lo, hi = -1, scores.numel() - 1  # smallest k with compression >= target lies in [lo, hi]
    if compression_at(hi) < target_compression:
        return tau_at(hi), compression_at(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if compression_at(mid) >= target_compression:
            hi = mid
        else:
            lo = mid + 1
    best, achieved = hi, compression_at(hi)
    if hi > -1:
        below = compression_at(hi - 1)
        if abs(below - target_compression) < abs(achieved - target_compression):
            best, achieved = hi - 1, below
    return tau_at(best), achieved


def compression_table(
    entropies: torch.Tensor,
    taus: Sequence[float],
    max_patch_length: int | None = None,
    row_width: int | None = None,
    mode: str = "entropy",
) -> list[dict[str, float]]:
    """Compression and mean patches per image for each tau (sorted ascending) over entropies (N, T)."""
    rows = []
    for tau in sorted(float(t) for t in taus):
        compression = compression_for_threshold(entropies, tau, max_patch_length, row_width, mode)
        rows.append({"threshold": tau, "compression": compression, "patches_per_image": entropies.shape[1] / compression})
    return rows


def default_taus(entropies: torch.Tensor, mode: str = "entropy", levels: Sequence[float] = QUANTILE_LEVELS) -> list[float]:
    """Quantiles of the gate scores of entropies (N, T): a tau range for compression tables."""
    scores = gate_scores(entropies, mode).numpy()
    return sorted(set(float(np.float32(q)) for q in np.quantile(scores[np.isfinite(scores)], levels)))


def patch_length_histogram(lengths: torch.Tensor) -> torch.Tensor:
    """Counts (L_max + 1,) int64 of patch lengths from zero-padded lengths (B, M); index = length."""
    real = lengths[lengths > 0]
    return torch.bincount(real, minlength=int(real.max()) + 1 if real.numel() else 1)


def histogram_for_threshold(
    entropies: torch.Tensor,
    threshold: float | None,
    max_patch_length: int | None = None,
    row_width: int | None = None,
    mode: str = "entropy",
) -> torch.Tensor:
    """Patch-length histogram (index = length) over entropies (N, T), accumulated in chunks."""
    total = torch.zeros(1, dtype=torch.int64)
    for starts in _iter_starts(entropies, threshold, max_patch_length, row_width, mode):
        counts = patch_length_histogram(patch_lengths_from_starts(starts))
        if counts.numel() > total.numel():
            total = torch.cat([total, torch.zeros(counts.numel() - total.numel(), dtype=torch.int64)])
        total[: counts.numel()] += counts
    return total


def format_histogram(histogram: dict[str, int], width: int = 40) -> str:
    """Text bars for a length histogram {length: count}, one line per non-empty length."""
    total = sum(histogram.values())
    peak = max(histogram.values())
    lines = []
    for length, n in sorted((int(k), v) for k, v in histogram.items()):
        bar = "#" * max(1, round(width * n / peak))
        lines.append(f"  len {length:4d}: {n:10d} ({100 * n / total:5.1f}%) {bar}")
    return "\n".join(lines)


def calibrate_store(
    code_path: str,
    target_compression: float | None,
    threshold: float | None,
    max_patch_length: int | None,
    row_reset: bool,
    mode: str,
    sample: int | None,
    seed: int = 0,
) -> dict[str, Any]:
    """Calibrate (or evaluate) a threshold on a code store's entropies; returns a JSON-able report."""
    entropy, _ = read_entropy_file(code_path)
    grid_width = store_grid_width(code_path, entropy.shape[-1])
    row_width = grid_width if row_reset else None
    entropies = sample_entropies(entropy, sample, seed)  # (S, T)
    if target_compression is not None:
        threshold, achieved = threshold_for_compression(entropies, target_compression, max_patch_length, row_width, mode)
    else:
        achieved = compression_for_threshold(entropies, threshold, max_patch_length, row_width, mode)
    counts = histogram_for_threshold(entropies, threshold, max_patch_length, row_width, mode)
    taus = default_taus(entropies, mode) if mode in GATED_MODES else []
    return {
        "code_path": code_path,
        "grid_width": grid_width,
        "tokens_per_image": entropies.shape[1],
        "num_sequences": entropies.shape[0],
        "mode": mode,
        "threshold": threshold,
        "max_patch_length": max_patch_length,
        "row_reset": row_reset,
        "target_compression": target_compression,
        "compression": achieved,
        "patches_per_image": entropies.shape[1] / achieved,
        "length_histogram": {str(i): int(n) for i, n in enumerate(counts.tolist()) if n},
        "table": compression_table(entropies, taus, max_patch_length, row_width, mode),
    }


def main(args: argparse.Namespace) -> None:
    try:
        report = calibrate_store(
            args.code_path, args.target_compression, args.threshold, args.max_patch_length,
            not args.no_row_reset, args.mode, args.sample, args.seed,
        )
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"{report['code_path']}: {report['num_sequences']} sequences of {report['tokens_per_image']} tokens "
          f"(grid width {report['grid_width']})")
    print(f"mode={report['mode']} tau={report['threshold']} max_patch_length={report['max_patch_length']} "
          f"row_reset={report['row_reset']}")
    print(f"compression {report['compression']:.4f} tokens/patch, {report['patches_per_image']:.2f} patches/image")
    print("patch lengths:")
    print(format_histogram(report["length_histogram"]))
    if report["table"]:
        print(f"{'tau':>10} {'compression':>12} {'patches/img':>12}")
        for row in report["table"]:
            print(f"{row['threshold']:10.4f} {row['compression']:12.4f} {row['patches_per_image']:12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


def finish_patching_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The patching flags the entropy command lines share (--mode, --threshold or
    --target-compression, --max-patch-length and --sample, 0 = none): checked, the paper's tau
    filled in for a gated mode given neither."""
    if args.mode not in GATED_MODES and args.target_compression is not None:
        parser.error(f"mode {args.mode!r} has a fixed compression; drop --target-compression")
    if args.mode in GATED_MODES and args.threshold is None and args.target_compression is None:
        args.threshold = PAPER_THRESHOLD
    args.max_patch_length = args.max_patch_length or None
    args.sample = args.sample or None
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Calibrate the patching threshold on stored entropies.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--code-path", required=True, help="code store directory holding entropy.npy")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target-compression", type=float, default=None, help="tokens per patch to reach")
    target.add_argument("--threshold", type=float, default=None, help=f"tau to evaluate (default {PAPER_THRESHOLD})")
    parser.add_argument("--mode", choices=PATCH_MODES, default="entropy", help="patch boundary rule")
    parser.add_argument("--max-patch-length", type=int, default=4, help="length cap; 0 = no cap")
    parser.add_argument("--no-row-reset", action="store_true", help="let patches run across grid rows")
    parser.add_argument("--sample", type=int, default=10000, help="random sequences to use; 0 = all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample of (image, view) rows")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.max_patch_length < 0 or args.sample < 0:
        parser.error("--max-patch-length and --sample must be >= 0")
    return finish_patching_flags(parser, args)


if __name__ == "__main__":
    main(parse_args())
