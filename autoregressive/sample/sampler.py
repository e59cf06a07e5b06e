"""Class-conditional image sampling with a GPT or DPAR generator and the VQ decoder.

Each image has its own seed, derived from (global seed, image index): its token draws come
from that seed alone (generate's row_seeds), so an image does not depend on the other images
of its batch, on the batch size or on the number of processes (up to floating-point effects
of the batch shape on the network's arithmetic).
"""
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from autoregressive.models import model_family
from autoregressive.models.generate import Decoding, Generated, Sampling, generate
from autoregressive.sample.compiling import FAST_PATH_FAILURES, fast_path_failure
from entropy_model.patching import PatchingConfig


def image_seed(seed: int, index: int) -> int:
    """Seed of image `index` under global seed `seed` (numpy SeedSequence, a 64-bit value)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seeds and image indices must be >= 0, got seed {seed}, index {index}")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def to_uint8(images: torch.Tensor, size: int) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] -> (B, size, size, 3) uint8 as LlamaGen writes its FID
    samples: bicubic resize when size != H, then clamp(127.5 x + 128, 0, 255) truncated."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images.float(), size=(size, size), mode="bicubic")
    pixels = torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1)  # (B, H, W, 3)
    return pixels.to("cpu", dtype=torch.uint8).numpy()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SampleBatch:
    images: torch.Tensor  # (B, 3, H, W) float32 in [-1, 1] (unclamped decoder output)
    tokens: torch.Tensor  # (B, T) codes
    num_patches: Optional[torch.Tensor]  # (B,) patch-transformer steps per image (DPAR)
    seconds: float  # token generation time (excludes VQ decoding)
    patch_starts: Optional[torch.Tensor] = None  # (B, T) bool: the tokens that opened a patch (DPAR)


class Sampler:
    """A generator (GPT or DPAR, already in its sampling dtype on `device`), its entropy model
    and patching rule (DPAR), the VQ decoder (float32 on `device`) and how the decode steps run
    (eager by default; generate.fast_decoding for compiled steps and CUDA graphs)."""

    def __init__(
        self,
        model: nn.Module,
        vq: nn.Module,
        sampling: Sampling,
        device: torch.device,
        entropy_model: Optional[nn.Module] = None,
        patching: Optional[PatchingConfig] = None,
        decoding: Optional[Decoding] = None,
    ):
        self.model, self.vq, self.sampling, self.device = model, vq, sampling, device
        self.entropy_model, self.patching = entropy_model, patching
        self.decoding = decoding or Decoding()
        self.patched = model_family(model).patched
        if self.patched and patching is None:
            raise ValueError(f"a {model_family(model).name} sampler needs its patching rule")

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    @property
    def num_tokens(self) -> int:
        return self.model.config.block_size

    @property
    def grid_size(self) -> int:
        return self.model.config.grid_size

    @property
    def image_size(self) -> int:
        return self.grid_size * self.vq.downsample_factor

    def check_classes(self, classes: Sequence[int]) -> None:
        bad = [c for c in classes if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"class {bad[0]} is out of range: the model has {self.num_classes} classes "
                             f"(0..{self.num_classes - 1})")

    @torch.no_grad()
    def sample(self, classes: Sequence[int], seeds: Sequence[int]) -> SampleBatch:
        """Images for classes (B,), image i drawn from seeds[i]. On the fast path a failed compile
        or CUDA-graph capture raises compiling.FastPathError (one line naming --no-compile)."""
        self.check_classes(classes)
        cond = torch.tensor(list(classes), dtype=torch.long, device=self.device)
        extra = dict(entropy_model=self.entropy_model, patching=self.patching) if self.patched else {}
        synchronize(self.device)
        start = time.perf_counter()
        try:
            out: Generated = generate(self.model, cond, self.num_tokens, row_seeds=list(seeds),
                                      decoding=self.decoding, **asdict(self.sampling), **extra)
        except FAST_PATH_FAILURES as e:
            if not self.decoding.compile:
                raise
            raise fast_path_failure(e) from e
        synchronize(self.device)
        seconds = time.perf_counter() - start
        B, h = cond.shape[0], self.grid_size
        shape = (B, self.vq.config.codebook_embed_dim, h, h)
        images = self.vq.decode_code(out.tokens, shape).float()  # (B, 3, H, W)
        return SampleBatch(images, out.tokens, out.num_patches, seconds, out.patch_starts)


@dataclass
class Throughput:
    """Counts for images/s, tokens/s and mean patches per image."""

    images: int = 0
    tokens: int = 0
    patches: int = 0
    seconds: float = 0.0

    def add(self, batch: SampleBatch) -> None:
        self.images += batch.tokens.shape[0]
        self.tokens += batch.tokens.numel()
        self.patches += int(batch.num_patches.sum()) if batch.num_patches is not None else 0
        self.seconds += batch.seconds

    def summary(self, patched: bool) -> dict:
        out = {
            "images": self.images,
            "generation_seconds": self.seconds,
            "images_per_second": self.images / self.seconds if self.seconds > 0 else None,
            "tokens_per_second": self.tokens / self.seconds if self.seconds > 0 else None,
        }
        if patched and self.images:
            out["mean_patches_per_image"] = self.patches / self.images
            out["compression"] = self.tokens / self.patches
        return out


def format_throughput(summary: dict) -> str:
    if not summary.get("images_per_second"):
        return "no images generated"
    line = (f"{summary['images']} images in {summary['generation_seconds']:.1f} s: "
            f"{summary['images_per_second']:.2f} images/s, {summary['tokens_per_second']:.1f} tokens/s")
    if "mean_patches_per_image" in summary:
        line += (f", {summary['mean_patches_per_image']:.1f} patches/image "
                 f"({summary['compression']:.2f} tokens/patch)")
    return line


def batches(items: Sequence[int], size: int) -> List[Sequence[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
