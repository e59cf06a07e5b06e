"""The resolved settings of one training run (train_c2i.py), built once from the flags, the code
store and the device (autoregressive.train.loop.resolve_run) and only read afterwards."""
import argparse
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Mapping, Optional

from autoregressive.models.loss import LossConfig
from utils.checkpoint import plain_args


@dataclass(frozen=True)
class TrainRun:
    """Flags as parsed (`flags`, read-only; any flag reads as an attribute), except the resolved
    ones, which are fields: loss (the loss flags as a LossConfig), mixed_precision and compile (the
    'auto' defaults decided for the device), vocab_size, image_size, downsample_size and
    num_classes (from the code store), num_workers, threshold (tau as used), max_patch_length (DPAR: P_max as used, 0 = no cap) and
    run_name; and the derived ones: world_size, block_size (tokens per image), model_config (the
    registry config as a dict), run_dir, per_rank_batch_size and total_steps. DPAR runs add patching (the rule as a dict) and
    achieved_compression; every run records code_store_hash, and gated modes add entropy_model_hash
    and entropy_sha256 (None elsewhere, and then absent from the checkpoint's args);
    setting_changes lists the identity settings a run continued with (--continue-with-new-settings)
    and the step from which each applied."""

    flags: Mapping[str, Any]
    loss: LossConfig
    mixed_precision: str
    compile: bool
    world_size: int
    vocab_size: int
    block_size: int
    image_size: int
    downsample_size: int
    num_classes: int
    model_config: dict
    run_name: str
    run_dir: str
    threshold: Optional[float]
    num_workers: int
    per_rank_batch_size: int
    total_steps: int
    max_patch_length: Optional[int] = None
    patching: Optional[dict] = None
    achieved_compression: Optional[float] = None
    code_store_hash: Optional[str] = None
    entropy_model_hash: Optional[str] = None
    entropy_sha256: Optional[str] = None
    setting_changes: tuple = ()  # ({"from_step", "changes": {setting: [old, new]}}, ...): --continue-with-new-settings

    def __post_init__(self):
        object.__setattr__(self, "flags", MappingProxyType(dict(self.flags)))

    def __getattr__(self, name: str) -> Any:
        """Flags that resolution leaves as given."""
        flags = self.__dict__.get("flags", {})
        if name not in flags:
            raise AttributeError(f"TrainRun has no setting {name!r}")
        return flags[name]

    def args_dict(self) -> dict:
        """What checkpoints, args.json and wandb record as "args": the flags with the resolved
        values in place, then the derived values; plain values only."""
        resolved = ("mixed_precision", "compile", "vocab_size", "image_size", "downsample_size", "num_classes",
                    "run_name", "threshold", "max_patch_length", "num_workers")
        out = {**self.flags, **{k: getattr(self, k) for k in resolved}}
        out.update(world_size=self.world_size, block_size=self.block_size, model_config=self.model_config,
                   run_dir=self.run_dir)
        if self.code_store_hash is not None:
            out.update(code_store_hash=self.code_store_hash)
        if self.entropy_sha256 is not None:
            out.update(entropy_model_hash=self.entropy_model_hash, entropy_sha256=self.entropy_sha256)
        if self.patching is not None:
            out.update(achieved_compression=self.achieved_compression, patching=self.patching)
        out.update(per_rank_batch_size=self.per_rank_batch_size, total_steps=self.total_steps)
        if self.setting_changes:
            out.update(setting_changes=[dict(c) for c in self.setting_changes])
        return plain_args(argparse.Namespace(**out))


# What a run is (docs/design.md, "Run folders: lock, identity, inputs"): its model, data, entropies,
# patching rule and the optimisation settings that shape its weights. Not identity: how it is
# computed (world size, gradient accumulation, mixed precision, compile, workers, device), where
# it is written, how it logs, and how long it runs (except under a cosine decay, whose learning
# rates follow the total step count).
IDENTITY = ("gpt_model", "model_config", "code_store_hash", "entropy_model_hash", "entropy_sha256", "patching",
            "seed", "global_batch_size", "lr", "lr_schedule", "warmup_steps", "min_lr", "weight_decay", "beta1",
            "beta2", "max_grad_norm", "ema", "ema_decay", *(f.name for f in fields(LossConfig)))


def run_identity(args: Mapping[str, Any]) -> dict:
    """The settings that define a run, from its recorded args (a checkpoint's or args.json)."""
    decays = args.get("lr_schedule") == "cosine" and args.get("min_lr") != args.get("lr")
    keys = IDENTITY + (("total_steps",) if decays else ())
    return {k: args[k] for k in keys if k in args}


def identity_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict:
    """{setting: [saved, current]} for the identity settings that differ. A setting the saved
    record does not hold (written before it was recorded) is not compared."""
    ours, theirs = run_identity(current), run_identity(saved)
    return {k: [theirs[k], ours.get(k)] for k in sorted(theirs) if theirs[k] != ours.get(k)}


def describe_changes(changes: Mapping[str, list]) -> str:
    """'lr 0.001 -> 0.003, model_config.dropout_p 0.1 -> 0.0' (hashes shortened)."""
    def short(v):
        return f"{v[:12]}" if isinstance(v, str) and len(v) == 64 else repr(v)

    parts = []
    for key, (old, new) in changes.items():
        if isinstance(old, dict) and isinstance(new, dict):
            parts += [f"{key}.{k} {short(old.get(k))} -> {short(new.get(k))}" for k in sorted(set(old) | set(new))
                      if old.get(k) != new.get(k)]
        else:
            parts.append(f"{key} {short(old)} -> {short(new)}")
    return ", ".join(parts)
