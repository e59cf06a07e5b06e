"""One checkpoint format for every model kind.

A checkpoint file is a torch.save'd dict
    {"model", "optimizer", "step", "epoch", "data_position", "args", "rng"[, "ema"]}
with `args` a plain dict holding at least "gpt_model" (registry name) and "model_config"
(the config dataclass as a dict), so the model can be rebuilt from the file alone; "ema"
(train_c2i.py --ema) holds the averaged weights under the same names. Files are
written atomically and always loaded with weights_only=True.

FSDP runs write a torch.distributed.checkpoint directory instead: the "model" and
"optimizer" shards plus train_state.pt holding the other fields. load_checkpoint and
autoregressive.models.model_from_checkpoint accept such a directory too (consolidated in memory), and

    python -m utils.checkpoint export CHECKPOINT_DIR OUT.pt [--with-optimizer]

writes it as a single file.

Training checkpoints: where they live, what they hold, how a run resumes.

Run folder RESULTS/<run-name>/: args.json, log.jsonl, log.txt, checkpoints/<step:07d>.pt
(single process and DDP: one file) or checkpoints/<step:07d>/ (FSDP: a torch.distributed.checkpoint
directory with the model and optimizer shards plus train_state.pt), and exports/<step:07d>.pt
(FSDP with --export-consolidated). Checkpoints are written under a temporary name and renamed,
so the newest complete checkpoint is the one with the largest step. The last --keep-last are
kept (plus multiples of --keep-every).

Multi-node runs need the results folder on a filesystem every node sees (rank 0 writes the
single-file checkpoints; every rank writes its FSDP shards and reads on resume).

Resume order: the run folder's latest checkpoint; else --resume; else a fresh start. Elastic
restarts (torchrun --max-restarts) and requeued jobs therefore continue where they stopped.
RNG states (torch, CUDA, numpy, python, label dropout) are saved for every rank, so a resumed
run with the same world size reproduces the uninterrupted one bit for bit on CPU.
"""
import argparse
import errno
import os
import pickle
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from utils.cli import HelpFormatter
from utils.distributed import DistInfo, barrier, gather_objects
from utils.release import CONFIG_NAME, WEIGHTS_NAME, is_weights_folder, read_weights

TRAIN_STATE = "train_state.pt"  # non-tensor fields of a distributed checkpoint directory
WEIGHT_KEYS = ("model", "module", "state_dict")  # where checkpoints (ours, LlamaGen's) keep the weights
CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."  # activation-checkpoint wrappers in parameter names
CHECKPOINT_NAME = re.compile(r"^(\d{7,})(\.pt)?$")
ARCHITECTURE_KEYS = ("gpt_model", "model_config")
# config fields that shape training, not the weights: the architecture check lets them differ (the
# run's identity, autoregressive.train.settings, then asks for --continue-with-new-settings)
TRAINING_ONLY_FIELDS = ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "drop_path_rate")


class NoSpaceError(ValueError):
    """The device ran out of space (or quota) while a checkpoint was written."""


def is_no_space(error: BaseException) -> bool:
    """True when error, its causes, or (torch.distributed.checkpoint) any rank's failure is an
    OSError ENOSPC / EDQUOT."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, trace)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return False


def save_checkpoint_atomic(obj: dict, path: Union[str, Path]) -> None:
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed over
    `path`. Written through a Python file object, so a full disk surfaces as OSError ENOSPC
    (torch's own file writer reports only 'unexpected pos'); the partial file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
    if is_weights_folder(path):
        raise UnreadableCheckpoint(f"{path} is a weights folder ({CONFIG_NAME} + {WEIGHTS_NAME}), not a training "
                                   f"checkpoint: it has no optimizer or step (start a new run from it with "
                                   f"--init-weights)")
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


# ---------------------------------------------------------------------------------------
# Training checkpoints
# ---------------------------------------------------------------------------------------
def named_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Parameters under their state-dict names."""
    return {name.replace(CHECKPOINT_WRAPPER, ""): p for name, p in model.named_parameters()}


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(ckpt_dir: Path) -> list:
    """[(step, path)] of the complete checkpoints in ckpt_dir, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def checkpoint_problem(path: Path) -> Optional[str]:
    """None when a checkpoint (file or FSDP directory) can be read, else the one-line reason.
    Files are opened memory-mapped: the tensors themselves are not read."""
    try:
        read_checkpoint_args(path)
    except UnreadableCheckpoint as e:
        return str(e)
    except ValueError:
        pass  # readable, if not resumable: resume_source says why
    return None


def newest_readable(ckpt_dir: Path) -> tuple:
    """(newest readable checkpoint or None, [(path, reason)] of the unreadable ones newer than it)."""
    bad = []
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, bad
        bad.append((path, problem))
    return None, bad


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint out of the resume order (it is never deleted or written)."""
    target, n = path.with_name(f"{path.name}.unreadable"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.unreadable{n}"), n + 1
    path.rename(target)
    return target


def prune_checkpoints(ckpt_dir: Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete all but the newest keep_last checkpoints (and those at multiples of keep_every);
    the newest readable checkpoint is kept whatever its age."""
    found = list_checkpoints(ckpt_dir)
    doomed = [(step, path) for step, path in found[: max(0, len(found) - keep_last)]
              if not (keep_every and step % keep_every == 0)]
    if not doomed:
        return
    readable, _ = newest_readable(ckpt_dir)
    for _, path in doomed:
        if path != readable:
            _remove(path)


def _remove(path: Path) -> None:
    """Delete a checkpoint file or directory; one that is already gone is no error."""
    try:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    except FileNotFoundError:
        pass


def remove_partial_checkpoints(ckpt_dir: Path) -> None:
    """Delete temporary files/folders that a crash during a save left behind."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(".*.tmp*"):
            _remove(p)


# ---------------------------------------------------------------------------------------
# RNG states as tensors (weights_only loadable)
# ---------------------------------------------------------------------------------------
def capture_rng(generator: torch.Generator) -> dict:
    """This process's RNG states: torch, CUDA (current device), numpy, python, label dropout."""
    np_state = np.random.get_state()
    py_version, py_state, _ = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor([py_version, *py_state], dtype=torch.int64),
        "label_dropout": generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    pos, has_gauss = state["numpy_pos"].tolist()
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"][0])))
    py = state["python"].tolist()
    random.setstate((py[0], tuple(py[1:]), None))
    generator.set_state(state["label_dropout"])


def seed_rng(seed: int, rank: int, generator: torch.Generator) -> None:
    """Per-rank training randomness (dropout, label dropout), distinct across ranks and seeds."""
    torch_seed, np_seed, py_seed, label_seed = np.random.SeedSequence([seed, rank]).generate_state(4)
    torch.manual_seed(int(torch_seed))
    np.random.seed(int(np_seed))
    random.seed(int(py_seed))
    generator.manual_seed(int(label_seed))


# ---------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------
def save_training_checkpoint(ckpt_dir: Path, model: nn.Module, optimizer, state: dict, info: DistInfo,
                             sharded: bool, generator: torch.Generator, ema: Optional[Any] = None) -> Path:
    """Write checkpoint <step:07d> (all ranks call). state: step, epoch, data_position, args
    (plain), plus extras; the RNG states of every rank are gathered into state["rng"]. The EMA
    weights (--ema) go in as "ema": whole tensors in a file, shards in an FSDP directory."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {**state, "rng": gather_objects(capture_rng(generator))}
    name = f"{state['step']:07d}"
    if not sharded:
        path = ckpt_dir / f"{name}.pt"
        optim = get_optimizer_state_dict(model, optimizer)
        extra = {"ema": ema.state_dict()} if ema is not None else {}
        write = (lambda: save_checkpoint_atomic({"model": model.state_dict(), "optimizer": optim, **extra, **state},
                                                path)) if info.is_main else None
        _agree_on_save(write, path, ckpt_dir, info)
        return path
    import torch.distributed.checkpoint as dcp

    path, tmp = ckpt_dir / name, ckpt_dir / f".{name}.tmp"
    shards = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        shards["ema"] = ema.state_dict()

    def write_shards():  # every rank
        dcp.save(shards, checkpoint_id=str(tmp))

    def finish():  # rank 0, once every shard is written
        save_checkpoint_atomic(state, tmp / TRAIN_STATE)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)

    _agree_on_save(write_shards, path, ckpt_dir, info, partial=tmp)
    _agree_on_save(finish if info.is_main else None, path, ckpt_dir, info, partial=tmp)
    return path


def _agree_on_save(write: Optional[Any], path: Path, ckpt_dir: Path, info: DistInfo,
                   partial: Optional[Path] = None) -> None:
    """Run this rank's part of a save (write: None when it has none), then let every rank learn
    whether any rank ran out of space: all raise NoSpaceError (one line, naming the checkpoint
    and the one the run would resume from) and rank 0 removes the partial directory. Other
    failures propagate as they are."""
    full = False
    try:
        if write is not None:
            write()
    except BaseException as e:  # torch.distributed.checkpoint raises CheckpointException, a BaseException
        if not is_no_space(e):
            raise
        full = True
    full = any(gather_objects(full))
    if not full:
        return
    if info.is_main and partial is not None:
        shutil.rmtree(partial, ignore_errors=True)
    barrier()
    last, _ = newest_readable(ckpt_dir)
    resumes = f"the run resumes from {last}" if last is not None else "no checkpoint yet: the run starts over"
    raise NoSpaceError(f"no space left on device while saving {path}: free space and rerun; {resumes}")


def load_training_checkpoint(path: Path, model: nn.Module, optimizer, sharded: bool,
                             ema: Optional[Any] = None) -> dict:
    """Load weights, optimizer state and (when given) the EMA from a checkpoint file or FSDP
    directory into the (possibly sharded) model on every rank; returns the rest (step, epoch,
    data_position, args, rng) with state["ema_loaded"]. Either kind loads into either mode;
    LlamaGen's files ("steps", an optimizer state keyed by position) load too, without a
    data position or RNG states. A checkpoint without EMA weights starts the EMA at its weights."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)

    if is_dcp_checkpoint(path):
        import torch.distributed.checkpoint as dcp

        has_ema = ema is not None and _dcp_has(path, "ema")
        shards = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        if has_ema:
            shards["ema"] = ema.state_dict()  # loaded in place
        with warnings.catch_warnings():  # loading without a process group is intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(shards, checkpoint_id=str(path))
        set_model_state_dict(model, shards["model"])
        set_optimizer_state_dict(model, optimizer, shards["optimizer"])
        state = load_train_state(path)
    else:
        ckpt = load_checkpoint(path, mmap=True)
        if "optimizer" not in ckpt or ("step" not in ckpt and "steps" not in ckpt):
            raise ValueError(f"{path} holds weights but no training state (optimizer, step); it cannot be resumed "
                             f"(--init-weights starts a new run from its weights)")
        optim = ckpt.pop("optimizer")
        if "steps" in ckpt and "step" not in ckpt:  # LlamaGen's layout
            optim = named_optimizer_state(optim, model, optimizer)
            ckpt = {"step": int(ckpt.pop("steps")), "args": _plain(ckpt.pop("args", None)), **ckpt}
        options = StateDictOptions(full_state_dict=sharded)
        try:
            set_model_state_dict(model, ckpt.pop("model"), options=options)
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"{path} does not fit this model: {str(e).strip().splitlines()[0]}") from e
        set_optimizer_state_dict(model, optimizer, optim, options=options)
        has_ema = ema is not None and isinstance(ckpt.get("ema"), dict)
        if has_ema:
            ema.load_full(ckpt.pop("ema"))
        state = ckpt
    if ema is not None and not has_ema:
        ema.copy_from_model()
    return {**state, "ema_loaded": has_ema}


def _dcp_has(path: Path, prefix: str) -> bool:
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return any(k.startswith(f"{prefix}.") for k in keys)


def _plain(args) -> dict:
    """A checkpoint's args as a dict (LlamaGen stores an argparse.Namespace, or nothing)."""
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else {}


def named_optimizer_state(state: dict, model: nn.Module, optimizer) -> dict:
    """torch's optimizer.state_dict() (parameters numbered in param-group order, as LlamaGen
    saves it) -> the state keyed by parameter name that set_optimizer_state_dict takes. The
    groups must list as many parameters as this optimizer's (LlamaGen and we group alike:
    matrices with weight decay, then the rest)."""
    name_of = {id(p): name for name, p in named_parameters(model).items()}
    ours, theirs = optimizer.param_groups, state["param_groups"]
    if [len(g["params"]) for g in ours] != [len(g["params"]) for g in theirs]:
        raise ValueError(f"the checkpoint's optimizer has parameter groups of sizes "
                         f"{[len(g['params']) for g in theirs]}, this model's {[len(g['params']) for g in ours]}")
    names = {i: name_of[id(p)] for mine, saved in zip(ours, theirs) for i, p in zip(saved["params"], mine["params"])}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in theirs]
    return {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def load_initial_weights(path: Path, model: nn.Module, sharded: bool) -> None:
    """--init-weights: the weights of a checkpoint (ours, an export, or LlamaGen's) or of a weights
    folder (a release, or LlamaGen's Hugging Face format) into the (possibly sharded) model,
    strict; nothing else of that run is taken."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if is_weights_folder(path):
        weights = read_weights(Path(path) / WEIGHTS_NAME)
    else:
        weights, _ = checkpoint_weights(load_checkpoint(path, mmap=True))
    try:
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=sharded))
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"--init-weights {path} does not fit this model: {str(e).strip().splitlines()[0]}") from e


def export_weights(model: nn.Module, state: dict, path: Path, info: DistInfo, ema: Optional[Any] = None,
                   ckpt_dir: Optional[Path] = None) -> None:
    """Gather the full weights and EMA weights (all ranks call) and let rank 0 write the
    single-file format without optimizer state, for sampling. A full disk raises NoSpaceError on
    every rank, naming the newest checkpoint in ckpt_dir (default: the export's folder)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    extra = {"ema": ema.full_state_dict()} if ema is not None else {}
    write = (lambda: save_checkpoint_atomic({"model": full, **extra, **state}, path)) if info.is_main else None
    _agree_on_save(write, path, ckpt_dir or path.parent, info)


def read_checkpoint_args(path: Path) -> dict:
    """The args dict a checkpoint (file or FSDP directory) was trained with; for LlamaGen's
    files, which record no config, the (possibly empty) dict of their Namespace."""
    if is_dcp_checkpoint(path):
        problem = dcp_problem(path)
        if problem:
            raise UnreadableCheckpoint(problem)
        state = load_train_state(path)
    else:
        state = load_checkpoint(path, mmap=True)
    if "steps" in state and "step" not in state:
        return _plain(state.get("args"))
    args = state.get("args")
    if not isinstance(args, dict) or any(k not in args for k in ARCHITECTURE_KEYS):
        raise ValueError(f"{path} does not record its model (args.gpt_model / args.model_config); it cannot be resumed")
    return args


def check_same_architecture(saved: dict, args: argparse.Namespace, path: Path) -> None:
    """One-line ValueError when the checkpoint's model differs from the one this run builds.
    LlamaGen's files record at most the registry name; loading their weights strict checks the rest."""
    if saved.get("gpt_model", args.gpt_model) != args.gpt_model:
        raise ValueError(f"checkpoint {path} is a {saved['gpt_model']}, but this run builds {args.gpt_model}")
    if "model_config" not in saved:
        return
    ours, theirs = args.model_config, saved["model_config"]
    keys = (set(ours) | set(theirs)) - set(TRAINING_ONLY_FIELDS)
    diff = sorted(k for k in keys if ours.get(k) != theirs.get(k))
    if diff:
        k = diff[0]
        raise ValueError(f"checkpoint {path} has {args.gpt_model} with {k}={theirs.get(k)!r}, but this run builds "
                         f"{k}={ours.get(k)!r} ({len(diff)} config field(s) differ)")


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
