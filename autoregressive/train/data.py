"""Training data: the code store (validated against the flags), the seeded DistributedSampler
that can start an epoch part-way, the step-wise batch stream with a resumable position, and
the batch builders that turn stored codes into model inputs (GPT; DPAR adds patch lengths).

Data position = (epoch, samples of that epoch consumed over all ranks). Global batch j of an
epoch is always samples perm[j*B:(j+1)*B] of that epoch's permutation, whatever the world
size or accumulation, so a resume skips exactly the consumed batches.
"""
import argparse
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.data.dataloader import default_collate

from autoregressive.models.dpar import DPARConfig, build_patch_layout
from autoregressive.models.modules import drop_labels
from autoregressive.train.guards import TrainingError
from dataset.code_store import CodeDataset, CodeStore, check_code_store, code_store_hash, open_code_store
from entropy_model.calibrate import load_entropies, sample_entropies, threshold_for_compression
from entropy_model.patching import GATED_MODES, PatchingConfig, build_patch_batch, paper_threshold
from utils.checkpoint import checkpoint_sha256
from utils.cli import default_workers
from utils.distributed import DistInfo, broadcast_object

LLAMAGEN_VOCAB_SIZE = 16384
LLAMAGEN_NUM_CLASSES = 1000
LLAMAGEN_DOWNSAMPLE = 16
MAX_DEFAULT_WORKERS = 4
CALIBRATION_SAMPLE = 8192  # (image, view) rows used by --target-compression


# ---------------------------------------------------------------------------------------
# Code store and validation
# ---------------------------------------------------------------------------------------
def open_training_store(args: argparse.Namespace) -> CodeStore:
    """Open --code-path and resolve vocab size, image size and class count from it; explicit
    flags that disagree with the store raise a one-line ValueError. Updates args in place."""
    codebook = args.vocab_size
    has_manifest = (Path(args.code_path) / "manifest.json").is_file()  # else LlamaGen's layout
    store = open_code_store(args.code_path, codebook_size=None if has_manifest else codebook or LLAMAGEN_VOCAB_SIZE)
    check_code_store(store, codebook_size=codebook)
    args.vocab_size = store.codebook_size
    if store.grid_height != store.grid_width:
        raise ValueError(f"code store {store.path} has a {store.grid_height}x{store.grid_width} grid; "
                         f"the models need a square token grid")
    _resolve_grid(args, store)
    args.block_size = store.seq_len
    _resolve_classes(args, store)
    return store


def _resolve_grid(args: argparse.Namespace, store: CodeStore) -> None:
    """--image-size and --downsample-size from the store: a manifest records the image size, and
    with the token grid that fixes the downsampling factor; a flag that contradicts it stops."""
    grid = store.grid_width
    recorded = store.image_size
    if recorded is not None and recorded % grid == 0:
        factor = recorded // grid
        for flag, value, expected in (("--image-size", args.image_size, recorded),
                                      ("--downsample-size", args.downsample_size, factor)):
            if value is not None and value != expected:
                raise ValueError(f"{flag} {value} contradicts the code store {store.path}: it holds {recorded} px "
                                 f"images as a {grid}x{grid} token grid (downsample {factor}); drop {flag}")
        args.image_size, args.downsample_size = recorded, factor
        return
    args.downsample_size = args.downsample_size or LLAMAGEN_DOWNSAMPLE
    args.image_size = args.image_size or grid * args.downsample_size
    if args.image_size % args.downsample_size:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of --downsample-size "
                         f"{args.downsample_size}")
    check_code_store(store, grid=args.image_size // args.downsample_size)


def _resolve_classes(args: argparse.Namespace, store: CodeStore) -> None:
    """Default --num-classes from the store; check every stored label fits (full scan for the
    memory-mapped layout; LlamaGen's per-file layout is checked batch by batch instead)."""
    labels = np.asarray(store.labels) if store.layout != "llamagen" else None
    if args.num_classes is None:
        if "num_classes" in store.manifest:
            args.num_classes = int(store.manifest["num_classes"])
        elif labels is not None and len(labels):
            args.num_classes = int(labels.max()) + 1
        else:
            args.num_classes = LLAMAGEN_NUM_CLASSES
    if args.num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.unconditional or labels is None or not len(labels):
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= args.num_classes:
        raise ValueError(f"code store {store.path} holds class ids {low}..{high}, outside 0..{args.num_classes - 1} "
                         f"(--num-classes {args.num_classes})")


def entropy_dir(args: argparse.Namespace) -> Path:
    """Directory holding entropy.npy and entropy.json (--entropy-path may name the .npy file)."""
    path = Path(args.entropy_path or args.code_path)
    return path.parent if path.suffix == ".npy" else path


def open_entropies(args: argparse.Namespace, store: CodeStore, info: DistInfo) -> np.ndarray:
    """Memory-mapped entropies (N, views, T) float16 made for exactly this code store (and, with
    --entropy-model, by that checkpoint); records both hashes in args. Rank 0 hashes, all check."""
    hashes = None
    if info.is_main:
        model_hash = checkpoint_sha256(args.entropy_model) if args.entropy_model else None
        hashes = (code_store_hash(store.path), model_hash)
    args.code_store_hash, expected_model = broadcast_object(hashes)
    entropies, record = load_entropies(str(entropy_dir(args)), args.code_store_hash, expected_model)
    args.entropy_model_hash = record.get("entropy_model_hash")
    return entropies


def resolve_patching(args: argparse.Namespace, entropies: Optional[np.ndarray], grid_width: int) -> PatchingConfig:
    """Patching settings from the flags; --target-compression picks tau on a fixed sample of the
    stored entropies (the same on every rank). Records args.patching and args.threshold."""
    cap = args.max_patch_length or None
    row_width = None if args.no_row_reset else grid_width
    threshold, args.achieved_compression = args.threshold, None
    if args.patching_mode in GATED_MODES and threshold is None:
        threshold = paper_threshold(args.image_size)
        if args.target_compression is not None:
            sample = sample_entropies(entropies, CALIBRATION_SAMPLE, seed=args.seed)  # (S, T)
            threshold, achieved = threshold_for_compression(sample, args.target_compression, cap, row_width,
                                                            args.patching_mode)
            args.achieved_compression = achieved
    config = PatchingConfig(mode=args.patching_mode, threshold=threshold, max_patch_length=cap,
                            row_reset=not args.no_row_reset, static_length=args.static_length)
    args.threshold = threshold
    args.patching = config.to_dict()
    return config


# ---------------------------------------------------------------------------------------
# Batch builders: collate() runs in DataLoader workers (pure; it also builds DPAR's patch
# layout, so the training step reads no lengths on the host), __call__ in the main process
# (label dropout draws from a checkpointed generator).
# ---------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Model inputs (model(**inputs) -> (logits, loss)) and the sizes throughput is counted in."""

    inputs: dict
    tokens: int
    images: int
    patches: Optional[int] = None

    def to(self, device: torch.device) -> "Batch":
        """Copies queued with non_blocking=True (from pinned memory when the loader pins it)."""
        inputs = {k: v.to(device, non_blocking=True) if v is not None else None for k, v in self.inputs.items()}
        return Batch(inputs, self.tokens, self.images, self.patches)


class GPTBatches:
    """Stored view (codes (B, T), labels (B,)) -> idx (B, T-1), cond_idx (B,), targets (B, T)."""

    def __init__(self, vocab_size: int, num_classes: int, class_dropout_prob: float, conditional: bool = True):
        self.vocab_size = vocab_size
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.conditional = conditional

    def collate(self, samples: Sequence[tuple]) -> dict:
        codes, labels = default_collate([s[:2] for s in samples])
        return {"codes": codes, "labels": labels}  # (B, T) int64, (B,) int64

    def labels(self, labels: torch.Tensor, generator: torch.Generator) -> Optional[torch.Tensor]:
        if not self.conditional:
            return None
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            bad = high if high >= self.num_classes else low
            raise TrainingError(f"class id {bad} in the code store is outside 0..{self.num_classes - 1} "
                                f"(--num-classes)")
        # null class = num_classes (the embedding's extra row)
        return drop_labels(labels, self.class_dropout_prob, self.num_classes, generator)

    def __call__(self, raw: dict, generator: torch.Generator) -> Batch:
        codes = raw["codes"]  # (B, T), on the CPU: checking costs no device sync
        if int(codes.max()) >= self.vocab_size:
            raise TrainingError(f"code {int(codes.max())} in the code store is outside the codebook "
                                f"0..{self.vocab_size - 1}")
        inputs = {"idx": codes[:, :-1], "cond_idx": self.labels(raw["labels"], generator), "targets": codes}
        return Batch(inputs, tokens=codes.numel(), images=codes.shape[0])


class DPARBatches(GPTBatches):
    """As GPTBatches plus the batch's PatchLayout (model input `patch_lengths`), built in the
    worker from the patch lengths (B, M) that the entropies (B, T) and the patching rule give."""

    def __init__(self, vocab_size: int, num_classes: int, class_dropout_prob: float, patching: PatchingConfig,
                 grid_width: int, model_config: DPARConfig):
        super().__init__(vocab_size, num_classes, class_dropout_prob, conditional=True)
        self.patching = patching
        self.grid_width = grid_width
        self.model_config = model_config

    def collate(self, samples: Sequence[tuple]) -> dict:
        stacked = default_collate(samples)
        batch = {"codes": stacked[0], "labels": stacked[1], "entropy": stacked[2] if len(stacked) > 2 else None}
        out = build_patch_batch(batch, self.patching, self.grid_width)
        lengths = out["patch_lengths"]  # (B, M)
        layout = build_patch_layout(lengths, self.model_config)
        return {"codes": out["tokens"], "labels": out["labels"], "layout": layout, "patches": int((lengths > 0).sum())}

    def __call__(self, raw: dict, generator: torch.Generator) -> Batch:
        batch = super().__call__(raw, generator)
        batch.inputs["patch_lengths"] = raw["layout"]
        batch.patches = raw["patches"]
        return batch


# ---------------------------------------------------------------------------------------
# Sampler and stream
# ---------------------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch) whose current epoch can start after the
    first `start` indices of this rank's share."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def resolve_workers(args: argparse.Namespace) -> int:
    """--num-workers, by default the CPU cores this process may use (at most 4); recorded in args."""
    if args.num_workers is None:
        args.num_workers = default_workers(MAX_DEFAULT_WORKERS)
    return args.num_workers


class BatchStream:
    """Yields the micro-batches of one optimizer step at a time and knows its position.
    An epoch has num_samples // per_rank_batch // accum steps; leftovers are dropped so an
    optimizer step never spans two epochs."""

    def __init__(self, dataset: CodeDataset, builder: GPTBatches, info: DistInfo, args: argparse.Namespace):
        self.dataset, self.builder, self.info = dataset, builder, info
        self.global_batch, self.accum = args.global_batch_size, args.grad_accum_steps
        self.batch = args.global_batch_size // (info.world_size * args.grad_accum_steps)
        self.seed = args.seed
        self.sampler = ResumableSampler(dataset, info.world_size, info.rank, args.seed)
        self.loader = DataLoader(dataset, batch_size=self.batch, sampler=self.sampler, drop_last=True,
                                 num_workers=resolve_workers(args), collate_fn=builder.collate,
                                 pin_memory=info.device.type == "cuda", generator=torch.Generator())
        self.steps_per_epoch = self.sampler.num_samples // self.batch // self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"the code store holds {len(dataset)} images, fewer than one global batch "
                             f"({args.global_batch_size}); lower --global-batch-size")
        self.epoch, self.samples = 0, 0  # samples of this epoch consumed over all ranks
        self.iterator: Optional[Iterator] = None

    def position(self) -> dict:
        return {"epoch": self.epoch, "samples": self.samples}

    def seek(self, position: dict) -> None:
        self.epoch, self.samples = int(position["epoch"]), int(position["samples"])
        self.iterator = None

    def _start_epoch(self) -> None:
        if self.samples >= self.steps_per_epoch * self.global_batch:
            self.epoch, self.samples = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.samples // self.info.world_size
        self.dataset.set_epoch(self.epoch)
        self.loader.generator.manual_seed(self.seed * 100003 + self.epoch)  # worker seeds only
        self.iterator = iter(self.loader)

    def next_step(self, generator: torch.Generator) -> list:
        """The `accum` micro-batches (Batch, on the device) of the next optimizer step."""
        if self.iterator is None or self.samples >= self.steps_per_epoch * self.global_batch:
            self._start_epoch()
        batches = [self.builder(next(self.iterator), generator).to(self.info.device) for _ in range(self.accum)]
        self.samples += self.global_batch
        return batches


def build_stream(args: argparse.Namespace, store: CodeStore, info: DistInfo, model: Any) -> BatchStream:
    """Dataset + batch builder for the model kind (DPAR needs entropies) -> BatchStream."""
    if args.global_batch_size % (info.world_size * args.grad_accum_steps):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by world size "
                         f"{info.world_size} x --grad-accum-steps {args.grad_accum_steps}")
    drop = model.config.class_dropout_prob
    if getattr(model, "is_dpar", False):
        entropies = open_entropies(args, store, info) if args.patching_mode in GATED_MODES else None
        patching = resolve_patching(args, entropies, store.grid_width)
        builder = DPARBatches(args.vocab_size, args.num_classes, drop, patching, store.grid_width, model.config)
        dataset = CodeDataset(store, seed=args.seed, entropies=entropies)
    else:
        builder = GPTBatches(args.vocab_size, args.num_classes, drop, conditional=not args.unconditional)
        dataset = CodeDataset(store, seed=args.seed)
    args.per_rank_batch_size = args.global_batch_size // (info.world_size * args.grad_accum_steps)
    return BatchStream(dataset, builder, info, args)
