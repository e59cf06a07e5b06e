"""Training data: the code store (validated against the flags), the seeded DistributedSampler
that can start an epoch part-way, the step-wise batch stream with a resumable position, and
the batch builders that turn stored codes into model inputs (GPT; DPAR adds patch lengths).

Data position = (epoch, samples of that epoch consumed over all ranks). Global batch j of an
epoch is always samples perm[j*B:(j+1)*B] of that epoch's permutation, whatever the world
size or accumulation, so a resume skips exactly the consumed batches.
"""
import argparse
import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.data.dataloader import default_collate

from autoregressive.models import model_family
from autoregressive.models.dpar import DPARConfig, PatchLayout, build_patch_layout
from autoregressive.models.modules import drop_labels
from autoregressive.train.guards import TrainingError
from dataset.code_store import CodeDataset, CodeStore, check_code_store, open_code_store
from entropy_model.calibrate import load_entropies, sample_entropies, threshold_for_compression
from entropy_model.patching import (
    GATED_MODES, PAPER_SETTINGS, PatchingConfig, build_patch_batch, paper_threshold, unpublished_size_message)
from utils.cli import default_workers
from utils.distributed import DistInfo, decide_on_main
from utils.identity import FileWatch, checkpoint_sha256, code_store_hash, path_state

LLAMAGEN_VOCAB_SIZE = 16384
LLAMAGEN_NUM_CLASSES = 1000
LLAMAGEN_DOWNSAMPLE = 16
MAX_DEFAULT_WORKERS = 4
CALIBRATION_SAMPLE = 8192  # (image, view) rows used by --target-compression


# ---------------------------------------------------------------------------------------
# Code store and validation
# ---------------------------------------------------------------------------------------
def open_training_store(args: argparse.Namespace) -> tuple:
    """Open --code-path and resolve vocab size, tokens per image, image size, downsampling and
    class count from it; explicit flags that disagree with the store raise a one-line ValueError.
    Returns (store, {"vocab_size", "block_size", "image_size", "downsample_size", "num_classes"})."""
    codebook = args.vocab_size
    has_manifest = (Path(args.code_path) / "manifest.json").is_file()  # else LlamaGen's layout
    store = open_code_store(args.code_path, codebook_size=None if has_manifest else codebook or LLAMAGEN_VOCAB_SIZE)
    check_code_store(store, codebook_size=codebook)
    if store.grid_height != store.grid_width:
        raise ValueError(f"code store {store.path} has a {store.grid_height}x{store.grid_width} grid; "
                         f"the models need a square token grid")
    image_size, downsample_size = _resolve_grid(args, store)
    resolved = dict(vocab_size=store.codebook_size, block_size=store.seq_len, image_size=image_size,
                    downsample_size=downsample_size, num_classes=_resolve_classes(args, store))
    return store, resolved


def _resolve_grid(args: argparse.Namespace, store: CodeStore) -> tuple:
    """(image size, downsampling factor) from the store: a manifest records the image size, and
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
        return recorded, factor
    downsample_size = args.downsample_size or LLAMAGEN_DOWNSAMPLE
    image_size = args.image_size or grid * downsample_size
    if image_size % downsample_size:
        raise ValueError(f"--image-size {image_size} is not a multiple of --downsample-size {downsample_size}")
    check_code_store(store, grid=image_size // downsample_size)
    return image_size, downsample_size


def _resolve_classes(args: argparse.Namespace, store: CodeStore) -> int:
    """--num-classes, by default from the store; checks every stored label fits (full scan for the
    memory-mapped layout; LlamaGen's per-file layout is checked batch by batch instead)."""
    labels = np.asarray(store.labels) if store.layout != "llamagen" else None
    num_classes = args.num_classes
    if num_classes is None:
        if "num_classes" in store.manifest:
            num_classes = int(store.manifest["num_classes"])
        elif labels is not None and len(labels):
            num_classes = int(labels.max()) + 1
        else:
            num_classes = LLAMAGEN_NUM_CLASSES
    if num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1, got {num_classes}")
    if args.unconditional or labels is None or not len(labels):
        return num_classes
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"code store {store.path} holds class ids {low}..{high}, outside 0..{num_classes - 1} "
                         f"(--num-classes {num_classes})")
    return num_classes


def entropy_dir(args: argparse.Namespace) -> Path:
    """Directory holding entropy.npy and entropy.json (--entropy-path may name the .npy file)."""
    path = Path(args.entropy_path or args.code_path)
    return path.parent if path.suffix == ".npy" else path


@dataclass
class OpenedEntropies:
    """The entropies a run trains on: memory-mapped (N, views, T) float16, the hashes that name
    them, and (rank 0) the watch that notices when the file at their path is no longer them."""
    values: np.ndarray
    code_store_hash: str
    entropy_model_hash: Optional[str]
    sha256: str
    watch: Optional[FileWatch] = None


def open_entropies(args: argparse.Namespace, store: CodeStore, info: DistInfo) -> OpenedEntropies:
    """The entropies made for exactly this code store (and, with --entropy-model, by that
    checkpoint), memory-mapped on every rank. Rank 0 checks the identities (utils.identity;
    --verify-store re-hashes the codes and the entropies) and that every value is finite, and
    starts the watch; all ranks check the record when they map the file."""
    npy = entropy_dir(args) / "entropy.npy"
    opened = path_state(npy)  # before the checks: a switch during them shows at the first watch check

    def check_on_main() -> tuple:  # first, so that a re-hash (and the stat it records) happens once
        model_hash = checkpoint_sha256(args.entropy_model) if args.entropy_model else None
        store_hash = code_store_hash(store.path, verify=args.verify_store)
        load_entropies(str(entropy_dir(args)), store_hash, model_hash, verify=args.verify_store)
        return store_hash, model_hash

    store_hash, expected_model = decide_on_main(check_on_main, info.is_main)
    # rank 0 has checked the values; the other ranks only map the file
    values, record = load_entropies(str(entropy_dir(args)), store_hash, expected_model, check_finite=False)
    sha256 = record["entropy_file"]["sha256"]
    watch = FileWatch(npy, sha256, seen=opened) if info.is_main else None
    return OpenedEntropies(values, store_hash, record.get("entropy_model_hash"), sha256, watch)


def require_chosen_threshold(args: argparse.Namespace, image_size: int) -> None:
    """A gated DPAR run names its tau: --threshold, or --target-compression to calibrate one on
    its entropies. The paper's tau at image_size was chosen for the authors' entropy model, which
    was never released, so it cannot be the right default for any entropy model a user trains
    (on another model's entropies it may open no gate at all). One-line ValueError otherwise.
    Sizes without a published tau are refused by training_patching with their own message."""
    if args.patching_mode not in GATED_MODES or args.threshold is not None or args.target_compression is not None:
        return
    if image_size not in PAPER_SETTINGS:
        return
    paper = PAPER_SETTINGS[image_size]
    hint = f" (the paper's compression at {image_size} px is {paper.compression})" if paper.compression else ""
    raise ValueError(f"--patching-mode {args.patching_mode} needs --threshold or --target-compression: the paper's "
                     f"tau {paper.threshold} at {image_size} px belongs to the authors' entropy model (not released), "
                     f"not to the one that scored {entropy_dir(args) / 'entropy.npy'}{hint}")


def training_max_patch_length(args: argparse.Namespace, image_size: int) -> Optional[int]:
    """P_max as used (None = no cap): --max-patch-length when given (0 = no cap), else the paper's
    at image_size; at a size the paper publishes no setting for, no cap for the rules whose lengths
    need none ("token", "static" with --static-length) and a one-line ValueError for the others."""
    if args.max_patch_length is not None:
        return args.max_patch_length or None
    if image_size in PAPER_SETTINGS:
        return PAPER_SETTINGS[image_size].max_patch_length
    if args.patching_mode == "token" or args.static_length is not None:
        return None
    raise ValueError(unpublished_size_message(image_size))


def training_patching(args: argparse.Namespace, image_size: int, entropies: Optional[np.ndarray],
                      grid_width: int) -> tuple:
    """(PatchingConfig, achieved compression or None): the patching settings from the flags, with
    the paper's defaults for image_size (training_max_patch_length; a gated mode without
    --threshold or --target-compression takes the paper's tau, and refuses in one line at a size
    without a published setting). --target-compression picks tau on a fixed sample of the stored
    entropies (the same on every rank). Explicit flags always win."""
    cap = training_max_patch_length(args, image_size)
    row_width = None if args.no_row_reset else grid_width
    threshold, achieved = args.threshold, None
    if args.patching_mode in GATED_MODES and threshold is None:
        if args.target_compression is not None:
            sample = sample_entropies(entropies, CALIBRATION_SAMPLE, seed=args.seed)  # (S, T)
            threshold, achieved = threshold_for_compression(sample, args.target_compression, cap, row_width,
                                                            args.patching_mode)
        else:
            threshold = paper_threshold(image_size)
    config = PatchingConfig(mode=args.patching_mode, threshold=threshold, max_patch_length=cap,
                            row_reset=not args.no_row_reset, static_length=args.static_length)
    return config, achieved


# ---------------------------------------------------------------------------------------
# Batch builders: collate() runs in DataLoader workers (pure; it also builds DPAR's patch
# layout, so the training step reads no lengths on the host), __call__ in the main process
# (label dropout draws from a checkpointed generator).
# ---------------------------------------------------------------------------------------
@dataclass
class TrainBatch:
    """Model inputs (model(**inputs) -> (None, loss)) and the sizes throughput is counted in."""

    inputs: dict
    tokens: int
    images: int
    patches: Optional[int] = None

    def to(self, device: torch.device) -> "TrainBatch":
        """Copies queued with non_blocking=True (from pinned memory when the loader pins it).
        A DPAR layout's batch-dependent sizes are marked dynamic, so that a compiled training
        step compiles its shape-generic graph on the first batch (PatchLayout.mark_dynamic)."""
        inputs = {k: v.to(device, non_blocking=True) if v is not None else None for k, v in self.inputs.items()}
        inputs = {k: v.mark_dynamic() if isinstance(v, PatchLayout) else v for k, v in inputs.items()}
        return TrainBatch(inputs, self.tokens, self.images, self.patches)


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

    def __call__(self, raw: dict, generator: torch.Generator) -> TrainBatch:
        codes = raw["codes"]  # (B, T), on the CPU: checking costs no device sync
        if int(codes.max()) >= self.vocab_size:
            raise TrainingError(f"code {int(codes.max())} in the code store is outside the codebook "
                                f"0..{self.vocab_size - 1}")
        inputs = {"idx": codes[:, :-1], "cond_idx": self.labels(raw["labels"], generator), "targets": codes}
        return TrainBatch(inputs, tokens=codes.numel(), images=codes.shape[0])


@dataclass(frozen=True)
class _BufferSlice:
    """Where one tensor lives in pack_tensors' buffers."""
    dtype: torch.dtype
    offset: int
    shape: tuple


@dataclass(frozen=True)
class _Record:
    """A dataclass instance in pack_tensors' skeleton (its own type would be pinned or moved as a
    whole by the DataLoader, fields and all)."""
    cls: type
    fields: dict


def pack_tensors(tree: Any) -> tuple[dict, Any]:
    """One flat buffer per dtype holding every tensor in tree (dicts, lists, tuples and
    dataclasses, nested), and the tree with each tensor replaced by its slice. A DataLoader
    worker hands each tensor to the main process separately (shared memory and a file descriptor
    apiece, about half a millisecond each), so a DPAR batch of a dozen tensors travels as two."""
    parts: dict = {}
    sizes: dict = {}

    def strip(x):
        if isinstance(x, torch.Tensor):
            offset = sizes.get(x.dtype, 0)
            sizes[x.dtype] = offset + x.numel()
            parts.setdefault(x.dtype, []).append(x.reshape(-1))
            return _BufferSlice(x.dtype, offset, tuple(x.shape))
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(strip(v) for v in x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return _Record(type(x), {f.name: strip(getattr(x, f.name)) for f in dataclasses.fields(x)})
        return x

    skeleton = strip(tree)
    return {dtype: torch.cat(p) for dtype, p in parts.items()}, skeleton


def unpack_tensors(buffers: dict, skeleton: Any) -> Any:
    """The tree pack_tensors packed, its tensors views of the buffers."""
    def fill(x):
        if isinstance(x, _BufferSlice):
            n = math.prod(x.shape)
            return buffers[x.dtype][x.offset:x.offset + n].view(x.shape)
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(fill(v) for v in x)
        if isinstance(x, _Record):
            return x.cls(**{name: fill(v) for name, v in x.fields.items()})
        return x

    return fill(skeleton)


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
        buffers, skeleton = pack_tensors({"codes": out["tokens"], "labels": out["labels"], "layout": layout})
        return {"buffers": buffers, "skeleton": skeleton, "patches": int((lengths > 0).sum())}

    def __call__(self, raw: dict, generator: torch.Generator) -> TrainBatch:
        raw = {**unpack_tensors(raw["buffers"], raw["skeleton"]), "patches": raw["patches"]}
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


def resolve_workers(args: Any) -> int:
    """--num-workers, by default the CPU cores this process may use (at most 4)."""
    return default_workers(MAX_DEFAULT_WORKERS) if args.num_workers is None else args.num_workers


def per_rank_batch(args: Any, world_size: int) -> int:
    """Samples per rank and micro-batch; one-line ValueError when the global batch does not split."""
    if args.global_batch_size % (world_size * args.grad_accum_steps):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by world size "
                         f"{world_size} x --grad-accum-steps {args.grad_accum_steps}")
    return args.global_batch_size // (world_size * args.grad_accum_steps)


def steps_per_epoch(num_images: int, world_size: int, batch: int, accum: int) -> int:
    """Optimizer steps in one epoch: each rank's share (DistributedSampler pads it to
    ceil(N / world)) in whole steps of `accum` micro-batches of `batch`."""
    return -(-num_images // world_size) // batch // accum


class BatchStream:
    """Yields the micro-batches of one optimizer step at a time and knows its position.
    An epoch has num_samples // per_rank_batch // accum steps; leftovers are dropped so an
    optimizer step never spans two epochs."""

    def __init__(self, dataset: CodeDataset, builder: GPTBatches, info: DistInfo, args: Any):
        """args: the run's settings (a TrainRun, or parsed flags): batch sizes, seed, workers."""
        self.dataset, self.builder, self.info = dataset, builder, info
        self.global_batch, self.accum = args.global_batch_size, args.grad_accum_steps
        self.batch = per_rank_batch(args, info.world_size)
        self.seed = args.seed
        self.sampler = ResumableSampler(dataset, info.world_size, info.rank, args.seed)
        self.loader = DataLoader(dataset, batch_size=self.batch, sampler=self.sampler, drop_last=True,
                                 num_workers=resolve_workers(args), collate_fn=builder.collate,
                                 pin_memory=info.device.type == "cuda", generator=torch.Generator())
        self.steps_per_epoch = steps_per_epoch(len(dataset), info.world_size, self.batch, self.accum)
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
        """The `accum` micro-batches (TrainBatch, on the device) of the next optimizer step."""
        if self.iterator is None or self.samples >= self.steps_per_epoch * self.global_batch:
            self._start_epoch()
        batches = [self.builder(next(self.iterator), generator).to(self.info.device) for _ in range(self.accum)]
        self.samples += self.global_batch
        return batches


def build_stream(run: Any, store: CodeStore, entropies: Optional[np.ndarray], info: DistInfo,
                 model: Any) -> BatchStream:
    """Dataset + batch builder for the model kind (DPAR: run.patching, and the entropies of a
    gated mode) -> BatchStream. run: the TrainRun (autoregressive.train.settings)."""
    drop = model.config.class_dropout_prob
    if model_family(model).patched:
        patching = PatchingConfig.from_dict(run.patching)
        builder = DPARBatches(run.vocab_size, run.num_classes, drop, patching, store.grid_width, model.config)
        dataset = CodeDataset(store, seed=run.seed, entropies=entropies)
    else:
        builder = GPTBatches(run.vocab_size, run.num_classes, drop, conditional=not run.unconditional)
        dataset = CodeDataset(store, seed=run.seed)
    return BatchStream(dataset, builder, info, run)
