"""One checkpoint format for every model kind.

A checkpoint file is a torch.save'd dict
    {"model", "optimizer", "step", "epoch", "data_position", "args", "rng"}
with `args` a plain dict holding at least "gpt_model" (registry name) and "model_config"
(the config dataclass as a dict), so the model can be rebuilt from the file alone. Files are
written atomically and always loaded with weights_only=True.
"""
import argparse
import hashlib
import os
from pathlib import Path
from typing import Union

import torch


def file_sha256(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint_atomic(obj: dict, path: Union[str, Path]) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Union[str, Path], map_location="cpu") -> dict:
    """weights_only load; LlamaGen's released files may carry an argparse.Namespace, which is
    the one extra class allowed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # corrupt file, or unpickling refused
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot read checkpoint {path}: {first}") from e


def model_from_checkpoint(ckpt, strict: bool = True):
    """(path or loaded dict) -> (model in eval mode, args dict). Rebuilds the model from the
    stored registry name and config, then loads the weights strict."""
    from autoregressive.models import build_model_from_config

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    args = ckpt.get("args")
    if not isinstance(args, dict) or "gpt_model" not in args or "model_config" not in args:
        raise ValueError("checkpoint does not record its model (args.gpt_model / args.model_config missing)")
    model = build_model_from_config(args["gpt_model"], args["model_config"])
    try:
        model.load_state_dict(ckpt["model"], strict=strict)
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not fit {args['gpt_model']}: {str(e).splitlines()[0]}") from e
    return model.eval(), args
