"""One checkpoint format for every model kind.

A checkpoint file is a torch.save'd dict
    {"model", "optimizer", "step", "epoch", "data_position", "args", "rng"[, "ema"]}
with `args` a plain dict holding at least "gpt_model" (registry name) and "model_config"
(the config dataclass as a dict), so the model can be rebuilt from the file alone; "ema"
(train_c2i.py --ema) holds the averaged weights under the same names. Files are
written atomically and always loaded with weights_only=True.

FSDP runs write a torch.distributed.checkpoint directory instead: the "model" and
"optimizer" shards plus train_state.pt holding the other fields. load_checkpoint and
model_from_checkpoint accept such a directory too (consolidated in memory), and

    python -m utils.checkpoint export CHECKPOINT_DIR OUT.pt [--with-optimizer]

writes it as a single file.
"""
import argparse
import hashlib
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch

from utils.cli import HelpFormatter

TRAIN_STATE = "train_state.pt"  # non-tensor fields of a distributed checkpoint directory
WEIGHT_KEYS = ("model", "module", "state_dict")  # where checkpoints (ours, LlamaGen's) keep the weights


def file_sha256(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_sha256(path: Union[str, Path]) -> str:
    """SHA-256 naming a checkpoint: of the file's bytes, or for an FSDP directory of its files'
    relative names and bytes in name order."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode() + b"\0" + file_sha256(f).encode())
    return digest.hexdigest()


def save_checkpoint_atomic(obj: dict, path: Union[str, Path]) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def is_dcp_checkpoint(path: Union[str, Path]) -> bool:
    """True for a torch.distributed.checkpoint directory (FSDP runs)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def load_train_state(path: Union[str, Path]) -> dict:
    """The non-tensor fields (step, epoch, data_position, args, rng) of a checkpoint directory."""
    return load_checkpoint(Path(path) / TRAIN_STATE)


def consolidate_checkpoint(path: Union[str, Path], with_optimizer: bool = False) -> dict:
    """A checkpoint directory as one in-memory dict in the single-file format (full tensors
    on CPU); no process group needed."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "full.pt"
        with warnings.catch_warnings():  # it loads without a process group on purpose
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_to_torch_save(str(path), str(flat))
        shards = torch.load(flat, map_location="cpu", weights_only=True)
    ckpt = {**load_train_state(path), "model": shards["model"]}
    if with_optimizer and "optimizer" in shards:
        ckpt["optimizer"] = shards["optimizer"]
    if "ema" in shards:
        ckpt["ema"] = shards["ema"]
    return ckpt


class UnreadableCheckpoint(ValueError):
    """The file or directory is not a complete checkpoint (truncated, not a checkpoint, holds code)."""


def _load_failure(path: Path, error: Exception) -> str:
    """One line saying why torch.load refused `path`."""
    if isinstance(error, pickle.UnpicklingError) and "GLOBAL" in str(error):
        return f"{path} holds code (pickled Python objects) and will not be loaded"
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch.save's zip nor a legacy pickle
        return f"cannot read checkpoint {path}: it is not a torch.save file (a text file?)"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"cannot read checkpoint {path} (truncated or damaged?): {first}"


def load_checkpoint(path: Union[str, Path], map_location="cpu", mmap: bool = False) -> dict:
    """weights_only load; LlamaGen's released files may carry an argparse.Namespace, which is
    the one extra class allowed. A checkpoint directory (FSDP) is consolidated in memory.
    mmap=True maps the file instead of reading it (large checkpoints on many ranks).
    Files that cannot be read raise UnreadableCheckpoint with a one-line reason."""
    path = Path(path)
    if is_dcp_checkpoint(path):
        problem = dcp_problem(path)
        if problem:
            raise UnreadableCheckpoint(problem)
        return consolidate_checkpoint(path, with_optimizer=True)
    if path.is_dir():
        raise UnreadableCheckpoint(f"cannot read checkpoint {path}: a directory without .metadata (not a complete "
                                   f"distributed checkpoint)")
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as e:  # corrupt file, or unpickling refused
            raise UnreadableCheckpoint(_load_failure(path, e)) from e
    if not isinstance(obj, dict):
        raise UnreadableCheckpoint(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def dcp_problem(path: Union[str, Path]) -> Optional[str]:
    """None when a distributed checkpoint directory is complete: its metadata and train state
    load and every shard file holds the bytes the metadata points into; else the reason."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        return f"cannot read checkpoint {path}: its .metadata is damaged ({type(e).__name__})"
    needed: dict = {}
    for item in (metadata.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file() or shard.stat().st_size < size:
            have = shard.stat().st_size if shard.is_file() else "no"
            return f"cannot read checkpoint {path}: shard {name} is truncated or missing ({have} bytes of {size})"
    if not (path / TRAIN_STATE).is_file():
        return f"cannot read checkpoint {path}: {TRAIN_STATE} is missing"
    return None


def checkpoint_weights(ckpt: dict, prefer_ema: bool = False) -> Tuple[dict, bool]:
    """(state dict of the weights, whether they are the EMA weights) from a loaded checkpoint:
    ours ("model", optional "ema") or LlamaGen's ("model", "module" or "state_dict", optional "ema")."""
    weights = next((ckpt[k] for k in WEIGHT_KEYS if isinstance(ckpt.get(k), dict)), None)
    if weights is None:
        raise ValueError(f"the checkpoint has no weights under any of {WEIGHT_KEYS}")
    if prefer_ema and isinstance(ckpt.get("ema"), dict):
        return {**weights, **ckpt["ema"]}, True
    return weights, False


def model_from_checkpoint(ckpt, strict: bool = True, prefer_ema: bool = False):
    """(path or loaded dict) -> (model in eval mode, args dict). Rebuilds the model from the
    stored registry name and config, then loads the weights strict: the EMA weights when
    prefer_ema and the checkpoint has them (args["weights"] says "ema" or "raw")."""
    from autoregressive.models import build_model_from_config

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    args = ckpt.get("args")
    if not isinstance(args, dict) or "gpt_model" not in args or "model_config" not in args:
        raise ValueError("checkpoint does not record its model (args.gpt_model / args.model_config missing)")
    model = build_model_from_config(args["gpt_model"], args["model_config"])
    weights, used_ema = checkpoint_weights(ckpt, prefer_ema)
    try:
        model.load_state_dict(weights, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not fit {args['gpt_model']}: {str(e).splitlines()[0]}") from e
    return model.eval(), {**args, "weights": "ema" if used_ema else "raw"}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Checkpoint tools.",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a distributed checkpoint directory as one file (for sampling)",
                            formatter_class=HelpFormatter)
    export.add_argument("src", help="checkpoint directory written by an FSDP run")
    export.add_argument("out", help="output .pt file")
    export.add_argument("--with-optimizer", action="store_true", help="keep the optimizer state (for resuming)")
    args = parser.parse_args(argv)
    if not is_dcp_checkpoint(args.src):
        raise SystemExit(f"error: {args.src} is not a distributed checkpoint directory")
    try:
        save_checkpoint_atomic(consolidate_checkpoint(args.src, args.with_optimizer), args.out)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
