"""Exponential moving average of the weights (train_c2i.py --ema, LlamaGen's default decay 0.9999).

    ema <- decay * ema + (1 - decay) * param        after every optimizer step

The averages are tensors shaped like the parameters: under FSDP2 each is a DTensor with its
parameter's sharding, so every rank stores and updates only its own shard. Keys are the
model's state-dict names (activation-checkpoint wrappers stripped), so a checkpoint's "ema"
entry loads into the model like its "model" entry does.
"""
from typing import Dict

import torch
import torch.nn as nn

CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def named_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Parameters under their state-dict names."""
    return {name.replace(CHECKPOINT_WRAPPER, ""): p for name, p in model.named_parameters()}


class ModelEMA:
    """EMA copies of a model's parameters (same dtype, device and sharding)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = named_parameters(model)
        self.shadow = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the current parameters (local shards, one fused foreach op)."""
        ema = [_local(self.shadow[name]) for name in self.params]
        current = [_local(p.detach()) for p in self.params.values()]
        torch._foreach_lerp_(ema, current, 1.0 - self.decay)

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Restart the average at the current weights."""
        for name, p in self.params.items():
            _local(self.shadow[name]).copy_(_local(p.detach()))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The averages by name (DTensors under FSDP2: torch.distributed.checkpoint saves the shards)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_full(self, full: Dict[str, torch.Tensor]) -> None:
        """Load complete (unsharded) tensors, e.g. from a single-file checkpoint; each rank keeps
        its shard. Missing or unexpected names stop with a one-line ValueError."""
        missing, extra = sorted(set(self.shadow) - set(full)), sorted(set(full) - set(self.shadow))
        if missing or extra:
            raise ValueError(f"the checkpoint's EMA weights do not fit the model (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")
        for name, target in self.shadow.items():
            source = full[name].to(device=_local(target).device, dtype=target.dtype)
            if hasattr(target, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                source = distribute_tensor(source, target.device_mesh, target.placements).to_local()
            if source.shape != _local(target).shape:
                raise ValueError(f"the checkpoint's EMA weight {name} has shape {tuple(full[name].shape)}, "
                                 f"the model's {tuple(target.shape)}")
            _local(target).copy_(source)

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Complete tensors on the CPU (all ranks call under FSDP2: the shards are gathered)."""
        return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()
                for name, t in self.shadow.items()}
