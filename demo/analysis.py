"""Measurements the report is built from. Each function reads what the project's tools wrote
(code stores, entropies, training logs, checkpoints) and returns plain JSON-able numbers; the
patching, calibration, statistics, sampling, domain-metric and FLOPs logic stays in the tools.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from autoregressive.models import model_family
from autoregressive.models.generate import Sampling
from autoregressive.sample.loading import PatchingOverrides, entropy_model_for_dpar, load_generator, sampling_patching
from autoregressive.sample.sampler import SampleBatch, Sampler, Throughput, to_uint8
from dataset.code_store import open_code_store
from dataset.source_images import store_image_paths
from dataset.synthetic import mask_dir
from entropy_model.calibrate import (
    compression_table, default_taus, load_entropies, sample_entropies, store_grid_width, threshold_for_compression)
from entropy_model.patching import PAPER_THRESHOLDS, PatchingConfig
from entropy_model.stats import store_statistics
from evaluations.domain_metric import score_domain_metric
from evaluations.flops import flops_per_image
from tokenizer.vq_model import load_vq_checkpoint
from utils.checkpoint import checkpoint_dir, latest_checkpoint
from utils.identity import code_store_hash, file_sha256

PAPER_TAU, PAPER_VOCAB = PAPER_THRESHOLDS[256], 16384  # the paper's threshold and its VQ-16 codebook


def paper_equivalent_tau(codebook_size: int) -> float:
    """The paper's tau (7.8 nats of a possible ln 16384 = 9.70) at the same fraction of this
    codebook's maximum entropy ln(codebook_size)."""
    return PAPER_TAU / math.log(PAPER_VOCAB) * math.log(codebook_size)


# ---------------------------------------------------------------------------------------
# Entropies, calibration, patch statistics, detail masks
# ---------------------------------------------------------------------------------------
def stored_entropies(code_path: Path, entropy_ckpt: Path) -> np.ndarray:
    """Entropies (N, views, T) float16 of the store, refused unless made by this entropy model
    for these codes."""
    entropy, _ = load_entropies(str(code_path), code_store_hash(code_path), file_sha256(entropy_ckpt))
    return entropy


def token_detail_masks(code_path: Path, data_path: Path) -> np.ndarray:
    """(N, views, T) bool: a token is "detailed" when most of its pixels are detail in the
    synthetic mask of its image (flipped for flipped views)."""
    store = open_code_store(code_path)
    views = store.manifest["views"]
    if any(v not in ("center", "flip_center") for v in views):
        raise ValueError(f"detail masks need center (and flip_center) views, the store has {views}")
    size, (h, w) = store.manifest["image_size"], store.grid
    masks = np.zeros((len(store), len(views), h * w), dtype=bool)
    for n, path in enumerate(store_image_paths(store, data_path)):
        relative = Path(path).relative_to(data_path)
        pixels = np.asarray(Image.open(mask_dir(data_path) / relative).convert("L")) > 127  # (S, S)
        if pixels.shape != (size, size):
            raise ValueError(f"mask {relative} is {pixels.shape}, the store's images are {size}x{size}")
        for v, name in enumerate(views):
            m = pixels[:, ::-1] if name == "flip_center" else pixels
            share = m.reshape(h, size // h, w, size // w).mean(axis=(1, 3))  # (h, w) detail share per token
            masks[n, v] = (share > 0.5).reshape(-1)
    return masks


def detail_entropy(entropy: np.ndarray, detailed: np.ndarray, starts: np.ndarray) -> dict:
    """Mean entropy and patch-start rate on detailed vs flat tokens; arrays (R, T)."""
    e = entropy.astype(np.float64)
    out = {"detailed_tokens": int(detailed.sum()), "flat_tokens": int((~detailed).sum()),
           "detailed_share": float(detailed.mean())}
    for name, sel in (("detailed", detailed), ("flat", ~detailed)):
        out[f"mean_entropy_{name}"] = float(e[sel].mean()) if sel.any() else None
        out[f"start_rate_{name}"] = float(starts[sel].mean()) if sel.any() else None
    return out


def analyse_store(code_path: Path, data_path: Path, entropy_ckpt: Path, patching: dict, target: Optional[float],
                  threshold: Optional[float], inference_compressions: Sequence[float], batch_size: int) -> dict:
    """Calibrate tau (target mean patch length) or apply a given tau to the store's entropies,
    and measure what the report needs: compression table, patch statistics, per-image patch
    counts, inference thresholds, entropy on the masks' detailed vs flat tokens."""
    entropy = stored_entropies(code_path, entropy_ckpt)  # (N, views, T)
    store = open_code_store(code_path)
    width = store_grid_width(str(code_path), entropy.shape[-1])
    cap, row_width = patching["max_patch_length"], width if patching["row_reset"] else None
    rows = sample_entropies(entropy, None)  # (N * views, T) float32, every stored view
    if threshold is None:
        threshold, achieved = threshold_for_compression(rows, target, cap, row_width)
    config = PatchingConfig("entropy", threshold, cap, patching["row_reset"])
    starts = config.starts(rows, width)  # (R, T) bool
    counts = starts.sum(1).numpy()  # (R,) patches per image
    paper_tau = paper_equivalent_tau(store.codebook_size)
    taus = sorted(set(default_taus(rows) + [threshold, paper_tau]))
    inference = []
    for c in inference_compressions:
        tau, got = threshold_for_compression(rows, c, cap, row_width)
        inference.append({"target_compression": c, "threshold": tau, "compression": got})
    detailed = token_detail_masks(code_path, data_path).reshape(rows.shape)
    stats = store_statistics(str(code_path), config, sample=None, batch_size=batch_size)
    return {
        "image_size": store.manifest["image_size"], "grid": list(store.grid), "tokens_per_image": int(rows.shape[1]),
        "codebook_size": store.codebook_size, "num_sequences": int(rows.shape[0]), "count": len(store),
        "patching": config.to_dict(), "target_compression": target,
        "compression": float(rows.numel() / counts.sum()), "patches_per_image": float(counts.mean()),
        "patch_count_histogram": {str(k): int(v) for k, v in zip(*np.unique(counts, return_counts=True))},
        "statistics": stats, "paper_equivalent_tau": paper_tau,
        "table": compression_table(rows, taus, cap, row_width),
        "inference_thresholds": inference,
        "entropy_mean": float(rows.double().mean()), "entropy_max": math.log(store.codebook_size),
        "masks": detail_entropy(rows.numpy(), detailed, starts.numpy()),
    }


def patch_counts(analysis: dict) -> np.ndarray:
    """Per-image patch counts (R,) back from the analysis' histogram."""
    hist = analysis["patch_count_histogram"]
    return np.repeat([int(k) for k in hist], [hist[k] for k in hist])


# ---------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------
def run_checkpoint(run_dir: Path) -> Optional[Path]:
    return latest_checkpoint(checkpoint_dir(run_dir))


def checkpoint_step(run_dir: Path) -> int:
    """Step of the run folder's latest checkpoint (0 without one), from its file name."""
    path = run_checkpoint(run_dir)
    return int(path.name.split(".")[0]) if path is not None else 0


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_summary(run_dir: Path, batch_size: int) -> dict:
    """Loss curve, final loss and seconds per step of a train_c2i.py run folder (log.jsonl:
    one record per --log-every steps with the mean loss and steps/s of that interval)."""
    records = read_log(run_dir)
    if not records:
        raise ValueError(f"{run_dir} has no training log")
    seconds, previous, curve = 0.0, 0, []
    for r in records:
        steps = r["step"] - previous
        seconds += steps / r["steps_per_s"]
        previous = r["step"]
        curve.append([r["step"], r["loss"]])
    last = records[-1]
    out = {"steps": last["step"], "loss_curve": curve, "final_loss": last["loss"],
           "final_loss_steps": last["step"] - (records[-2]["step"] if len(records) > 1 else 0),
           "train_seconds": seconds, "seconds_per_step": seconds / last["step"],
           "images_per_second": batch_size * last["step"] / seconds}
    lengths = [(r["step"], r["mean_patch_length"]) for r in records if "mean_patch_length" in r]
    if lengths:  # DPAR: tokens / patches of the batches actually trained on, weighted by steps
        prev, total, weight = 0, 0.0, 0
        for step, length in lengths:
            total += (step - prev) / length
            weight += step - prev
            prev = step
        out["training_compression"] = weight / total
    return out


def static_patch_counts(config) -> np.ndarray:
    """(1,) patches per image of the static model's uniform pattern (same for every image)."""
    patching = PatchingConfig("static", None, config.max_patch_length, True, config.static_mean_length)
    return patching.starts(None, config.grid, shape=(1, config.grid**2)).sum(-1).numpy()


def compute_accounting(model_name: str, image_size: int, downsample: int, vocab: int, classes: int,
                       counts: Optional[np.ndarray] = None, compression: Optional[float] = None) -> dict:
    """evaluations.flops.flops_per_image for the demo's model at the demo's grid: DPAR at the
    measured per-image patch counts, or at a fixed compression (static patches)."""
    kwargs = {"patch_counts": counts} if counts is not None else {}
    if compression is not None:
        kwargs = {"compression": compression}
    return flops_per_image(model_name, image_size, vocab_size=vocab, num_classes=classes,
                           downsample_size=downsample, **kwargs)


# ---------------------------------------------------------------------------------------
# Sampling and the domain metric
# ---------------------------------------------------------------------------------------
def load_sampler(ckpt: Path, vq_ckpt: Path, entropy_ckpt: Path, device: torch.device, sampling: Sampling,
                 overrides: Optional[PatchingOverrides] = None) -> tuple[Sampler, dict]:
    """A Sampler (autoregressive/sample) for a GPT or DPAR checkpoint of this project."""
    vq = load_vq_checkpoint(vq_ckpt, "VQ-16").eval()
    model, args = load_generator(str(ckpt), None, vq.config.codebook_size, None, 0)
    entropy_model, patching = None, None
    if model_family(model).patched:
        patching = sampling_patching(args, overrides or PatchingOverrides())
        if patching.needs_entropy:
            entropy_model = entropy_model_for_dpar(str(entropy_ckpt), model, args).to(device)
    return Sampler(model.to(device), vq.to(device), sampling, device, entropy_model, patching), args


def collect_batches(batches: Sequence[SampleBatch], sampler: Sampler, labels: Sequence[int]) -> dict:
    """Join sampled batches (of classes `labels`, in order): images (N, S, S, 3) uint8, labels
    (N,), tokens (N, T), patches per image (N,) (DPAR, else None) and the throughput summary
    (token generation only, no decoding)."""
    meter = Throughput()
    for b in batches:
        meter.add(b)
    patches = [b.num_patches.cpu().numpy() for b in batches if b.num_patches is not None]
    starts = [b.patch_starts.cpu().numpy() for b in batches if b.patch_starts is not None]
    return {"images": np.concatenate([to_uint8(b.images, sampler.image_size) for b in batches]),
            "labels": np.asarray(labels, dtype=np.int64),
            "tokens": np.concatenate([b.tokens.cpu().numpy() for b in batches]),
            "num_patches": np.concatenate(patches) if patches else None,
            "patch_starts": np.concatenate(starts) if starts else None,
            "throughput": meter.summary(sampler.patched)}


def save_samples(path: Path, samples: dict) -> None:
    """npz with arr_0 (N, S, S, 3) uint8 and labels (N,) (the domain metric's input), tokens
    (N, T) and, for DPAR, num_patches (N,) and patch_starts (N, T) bool (the sampler's decisions)."""
    arrays = {"arr_0": samples["images"], "labels": samples["labels"], "tokens": samples["tokens"]}
    for key in ("num_patches", "patch_starts"):
        if samples.get(key) is not None:
            arrays[key] = samples[key]
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def evaluate_samples(npz: Path, classifier: Path, data_path: Path, seed: int) -> dict:
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["labels"]
    return score_domain_metric(str(classifier), images, labels, str(data_path), seed)


def sampling_meta(sampler: Sampler, args: dict) -> dict:
    return {"model": args.get("gpt_model"), "sampling": asdict(sampler.sampling),
            "patching": sampler.patching.to_dict() if sampler.patching else None}
