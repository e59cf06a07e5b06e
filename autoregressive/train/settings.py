"""The resolved settings of one training run (train_c2i.py), built once from the flags, the code
store and the device (autoregressive.train.loop.resolve_run) and only read afterwards."""
import argparse
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional

from utils.checkpoint import plain_args


@dataclass(frozen=True)
class TrainRun:
    """Flags as parsed (`flags`, read-only; any flag reads as an attribute), except the resolved
    ones, which are fields: mixed_precision and compile (the 'auto' defaults decided for the
    device), vocab_size, image_size, downsample_size and num_classes (from the code store),
    num_workers, threshold (tau as used), max_patch_length (DPAR: P_max as used, 0 = no cap) and
    run_name; and the derived ones: world_size, block_size (tokens per image), model_config (the
    registry config as a dict), run_dir, per_rank_batch_size and total_steps. DPAR runs add patching (the rule as a dict) and
    achieved_compression; gated modes add code_store_hash and entropy_model_hash (None
    elsewhere, and then absent from the checkpoint's args)."""

    flags: Mapping[str, Any]
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
            out.update(code_store_hash=self.code_store_hash, entropy_model_hash=self.entropy_model_hash)
        if self.patching is not None:
            out.update(achieved_compression=self.achieved_compression, patching=self.patching)
        out.update(per_rank_batch_size=self.per_rank_batch_size, total_steps=self.total_steps)
        return plain_args(argparse.Namespace(**out))
