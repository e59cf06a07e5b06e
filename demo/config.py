"""Settings of a demo run: one dataclass, four presets, command-line overrides.

Presets (times on a 2-core CPU): "tiny" (tests, a minute or two; the numbers mean nothing),
"quick" (a smoke run in under 10 minutes; its pictures prove nothing about quality), "default"
(about 30 minutes: 6 shape classes at 32px, an 8x8 token grid, models trained long enough to draw
their class) and "full" (default plus the static-patch model and the multi-resolution study; hours).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

from autoregressive.models import DPAR_FAMILY, GPT_FAMILY
from dataset.synthetic import FAMILIES

PRESETS = ("tiny", "quick", "default", "full")


@dataclass
class DemoConfig:
    """Every knob of a demo run. Sizes are per resolution of the main study."""
    preset: str = "default"
    seed: int = 0
    device: str = "auto"
    # synthetic data
    classes: int = 6
    per_class: int = 500
    image_size: int = 32
    # 4 palette colours on flat backgrounds and large objects: every colour pair and shape is seen
    # often, and a shape spans enough tokens to be told apart
    colours: int = 4
    flat_share: float = 1.0  # share of flat backgrounds; the rest are gradients
    radius: list[float] = field(default_factory=lambda: [0.3, 0.45])  # object radius range (image sizes)
    # VQ tokenizer (downsample 2 ** (len(vq_ch_mult) - 1)); cosine learning rate, dead codes restarted
    vq_ch: int = 32
    vq_ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    vq_res_blocks: int = 1
    vq_z_channels: int = 32
    codebook_size: int = 64  # few codes: a flat colour maps to few codes, so the generators see clean sequences
    vq_steps: int = 1500
    vq_batch: int = 16
    vq_lr: float = 2e-3
    vq_restart_every: int = 50
    # entropy model (unconditional GPT)
    entropy_model: str = "GPT-T"
    entropy_steps: int = 800
    entropy_batch: int = 32
    entropy_lr: float = 1e-3
    # patching
    target_compression: float = 1.81  # the paper's mean patch length at 256px
    max_patch_length: int = 4
    inference_compressions: list[float] = field(default_factory=lambda: [1.4, 2.4])
    # DPAR and the baseline: same depth and width, data, seed, steps and batches
    model_size: str = "XS"
    train_steps: int = 2500
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr: float = 5e-5  # cosine decay from lr to min_lr over train_steps
    train_rounds: int = 1  # >1: alternating chunks (fair wall-clock under load); each chunk restarts the cosine
    # sampling and evaluation
    samples_per_class: int = 20
    cfg_scale: float = 2.0
    temperature: float = 1.0
    top_k: int = 0
    sample_batch: int = 60
    classifier_epochs: int = 60
    # --full only
    static_model: bool = False
    # the static model's uniform patches (entropy_model.patching.static_pattern_starts): None = the
    # calibrated mean length, as in the paper's ablation (uniform patches of DPAR's mean length)
    static_patch_length: Optional[float] = None
    static_eval_lengths: list[float] = field(default_factory=lambda: [1.0, 1.4, 2.4])  # also sampled at these
    resolutions: list[int] = field(default_factory=list)  # extra image sizes of the multi-resolution study

    @staticmethod
    def log_every(steps: int) -> int:
        """Training log interval: about 25 records per run (the loss curves' resolution)."""
        return max(1, steps // 25)

    @property
    def gpt_model(self) -> str:
        return f"GPT-{self.model_size}"

    @property
    def dpar_model(self) -> str:
        return f"DPAR-{self.model_size}"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vq_ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    def check(self) -> None:
        """ValueError (one line) for settings that cannot work."""
        if self.gpt_model not in GPT_FAMILY.configs or self.dpar_model not in DPAR_FAMILY.configs:
            raise ValueError(f"--model-size {self.model_size}: the registries need both {self.gpt_model} and "
                             f"{self.dpar_model}")
        if self.entropy_model not in GPT_FAMILY.configs:
            raise ValueError(f"--entropy-model must be a GPT registry name, got {self.entropy_model}")
        if not 2 <= self.classes <= len(FAMILIES):
            raise ValueError(f"--classes must be between 2 and {len(FAMILIES)}, got {self.classes}")
        for size in [self.image_size, *self.resolutions]:
            if size % self.downsample:
                raise ValueError(f"image size {size} is not a multiple of the VQ's downsample factor {self.downsample}")
        if self.per_class * self.classes * 2 < max(self.batch_size, self.entropy_batch):
            raise ValueError("the dataset (2 views per image) holds fewer sequences than one batch")
        if self.per_class * self.classes < self.vq_batch:
            raise ValueError("the dataset holds fewer images than one VQ batch")
        if self.target_compression < 1:
            raise ValueError(f"--target-compression must be >= 1, got {self.target_compression}")
        if self.train_rounds > 1 and self.min_lr != self.lr:
            raise ValueError("train_rounds > 1 restarts the cosine learning-rate schedule in every round; use 1 "
                             "(or min_lr = lr for a constant rate)")
        if min([self.static_mean_length, *self.static_eval_lengths]) < 1:
            raise ValueError("static patch lengths must be >= 1")
        if self.vq_ch % 8:
            raise ValueError(f"--vq-ch must be a multiple of 8 (GroupNorm with 8 groups), got {self.vq_ch}")

    @property
    def static_mean_length(self) -> float:
        """Mean patch length the static model trains with."""
        return self.target_compression if self.static_patch_length is None else self.static_patch_length

    @property
    def static_sample_lengths(self) -> list[float]:
        """Mean patch lengths the static model is sampled at: its training length first."""
        return [self.static_mean_length] + [n for n in self.static_eval_lengths if n != self.static_mean_length]


def preset(name: str) -> DemoConfig:
    """The settings of a preset (before command-line overrides)."""
    if name == "tiny":
        return DemoConfig(
            preset=name, classes=3, per_class=16, image_size=64, vq_ch=8, vq_z_channels=16, codebook_size=256,
            vq_steps=30, vq_batch=16, vq_lr=2e-3, entropy_steps=100, entropy_batch=16, entropy_lr=3e-3, model_size="T",
            train_steps=8, batch_size=16, warmup_steps=0, inference_compressions=[2.4],
            samples_per_class=2, sample_batch=6, classifier_epochs=2,
        )
    if name == "quick":
        return DemoConfig(
            preset=name, per_class=60, vq_ch=16, vq_steps=600, entropy_steps=400,
            entropy_lr=2e-3, train_steps=300, batch_size=16, warmup_steps=15, inference_compressions=[2.4],
            samples_per_class=8, sample_batch=48, classifier_epochs=20,
        )
    config = DemoConfig(preset=name)
    if name == "full":
        config.static_model = True
        config.resolutions = [48, 64]
    return config


# command-line overrides: DemoConfig field -> (type, help)
OVERRIDES = {
    "classes": (int, "classes of the synthetic dataset (2-12)"),
    "per_class": (int, "images per class"),
    "image_size": (int, "image size in pixels (the token grid is image size / 4)"),
    "colours": (int, "palette colours of the synthetic images (2-12)"),
    "flat_share": (float, "share of flat backgrounds in the synthetic images (the rest are gradients)"),
    "vq_ch": (int, "VQ base width (a multiple of 8)"),
    "codebook_size": (int, "VQ codebook size"),
    "vq_steps": (int, "VQ training steps"),
    "entropy_model": (str, "GPT registry name of the unconditional entropy model"),
    "entropy_steps": (int, "entropy model training steps"),
    "target_compression": (float, "mean tokens per patch tau is calibrated to (paper at 256px: 1.81)"),
    "max_patch_length": (int, "patch length cap P_max"),
    "model_size": (str, "size of both compared models: GPT-<size> and DPAR-<size> (T, XS, S, B, L, ...)"),
    "train_steps": (int, "training steps of each compared model"),
    "batch_size": (int, "training batch of each compared model"),
    "lr": (float, "learning rate of the compared models"),
    "samples_per_class": (int, "samples per class and setting for the domain metric"),
    "cfg_scale": (float, "classifier-free guidance scale"),
    "top_k": (int, "top-k sampling (0 = off)"),
    "classifier_epochs": (int, "epochs of the domain-metric classifier"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preset (default: about 30 minutes on a 2-core CPU)")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--tiny", dest="preset", action="store_const", const="tiny",
                      help="smoke-test scale (tests): 3 classes, a few steps; numbers mean nothing")
    size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help="a smoke run in under 10 minutes: smaller data, shorter training; proves nothing about quality")
    size.add_argument("--full", dest="preset", action="store_const", const="full",
                      help="default plus the static-patch model and the multi-resolution study (hours on CPU)")
    p.set_defaults(preset="default")
    g = p.add_argument_group("overrides (default: the preset's)")
    for name, (kind, text) in OVERRIDES.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=text)
    g.add_argument("--radius", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="object radius range of the synthetic images, as fractions of the image size")
    g.add_argument("--inference-compressions", type=float, nargs="+", default=None,
                   help="extra mean patch lengths DPAR is sampled at (tau calibrated for each)")
    g.add_argument("--resolutions", type=int, nargs="*", default=None,
                   help="extra image sizes of the multi-resolution study (--full: 48 64)")
    g.add_argument("--static-model", action=argparse.BooleanOptionalAction, default=None,
                   help="train and sample the static-patch DPAR (--full: on)")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    config = preset(args.preset)
    for name in OVERRIDES:
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    for name in ("radius", "inference_compressions", "resolutions", "static_model"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    config.seed, config.device = args.seed, args.device
    config.check()
    return config


def as_dict(config: DemoConfig) -> dict:
    return dataclasses.asdict(config)


def stage_params(config: DemoConfig, names: Sequence[str]) -> dict:
    """The subset of settings one stage depends on (its marker's parameters)."""
    return {n: getattr(config, n) for n in names}

