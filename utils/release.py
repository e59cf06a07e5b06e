"""Weights folders, the layout models are shared in on the Hugging Face hub:

    FOLDER/config.json          what rebuilds the model (see autoregressive/models/release.py)
    FOLDER/model.safetensors    the state dict, tensors only (no pickle: loading runs no code)
    FOLDER/README.md            the model card

This module reads and writes such folders without knowing any model: the config as a dict, the
weights as a state dict. A folder written by LlamaGen's `TransformerHF.save_pretrained` has the
same three files. Every failure is a one-line ValueError naming the file. Hub repo ids go
through huggingface_hub's own snapshot_download / upload_folder.
"""
import json
import os
import re
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

FORMAT = "dpar-release"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_weights_folder(path: Union[str, Path]) -> bool:
    """True for a folder holding config.json and model.safetensors (ours or LlamaGen's)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def looks_like_repo_id(name: str) -> bool:
    """'owner/name' that is not a local path nor a checkpoint file name: a hub repo id."""
    name = str(name)
    return bool(REPO_ID.match(name)) and not name.endswith(CHECKPOINT_SUFFIXES) and not Path(name).exists()


def local_folder(folder_or_repo_id: Union[str, Path]) -> Path:
    """A local weights folder, or a hub repo id downloaded (or found in the cache) by
    huggingface_hub.snapshot_download."""
    path = Path(folder_or_repo_id)
    if is_weights_folder(path):
        return path
    if path.is_dir():
        raise ValueError(f"{path} is not a weights folder ({CONFIG_NAME} and {WEIGHTS_NAME} expected)")
    if not looks_like_repo_id(str(folder_or_repo_id)):
        raise ValueError(f"{path}: no such weights folder (nor a hub repo id owner/name)")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(str(folder_or_repo_id)))
    except Exception as e:  # the hub's errors (not found, offline, credentials) vary by version
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{folder_or_repo_id}: no such local folder, and the hub gives no repo of that id "
                         f"({type(e).__name__}: {first})") from None
    if not is_weights_folder(folder):
        raise ValueError(f"hub repo {folder_or_repo_id} is not a weights folder ({CONFIG_NAME} and {WEIGHTS_NAME} "
                         f"expected)")
    return folder


def push_folder(folder: Union[str, Path], repo_id: str, private: bool = False) -> str:
    """Upload a weights folder to the hub repo (created when missing); needs credentials
    (`huggingface-cli login` or HF_TOKEN). Returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, private=private, exist_ok=True)
    info = upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"Upload {Path(folder).name}")
    return str(getattr(info, "commit_url", info))


def read_config(folder: Union[str, Path]) -> dict:
    path = Path(folder) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def read_weights(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The tensors of a .safetensors file on CPU. safetensors parses a JSON header and raw
    bytes, never pickle, so a file cannot run code; a truncated or foreign file is a
    one-line ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read weights {path} (truncated or not a safetensors file?): {first}") from None


def weights_problem(model: nn.Module, state: Dict[str, torch.Tensor]) -> Optional[str]:
    """None when `state` has exactly the model's state-dict keys and shapes, else the first difference."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")]
                 if missing else []) + \
                ([f"unexpected {unexpected[0]}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else "")]
                 if unexpected else [])
        return "; ".join(parts)
    for k, tensor in expected.items():
        if tuple(state[k].shape) != tuple(tensor.shape):
            return f"{k} is {tuple(state[k].shape)}, the model's {tuple(tensor.shape)}"
    return None


def load_weights_strict(model: nn.Module, path: Union[str, Path], what: str) -> nn.Module:
    """Load a .safetensors file into `model` (strict: same keys, same shapes; dtypes cast as
    load_state_dict does). `what` names the model in the error."""
    state = read_weights(path)
    problem = weights_problem(model, state)
    if problem:
        raise ValueError(f"{path} does not fit {what}: {problem}")
    model.load_state_dict(state, strict=True)
    return model


def write_weights_folder(folder: Union[str, Path], config: dict, state_dict: Dict[str, torch.Tensor],
                         card: str) -> Path:
    """Write config.json, model.safetensors and README.md into `folder` (created). Tensors are
    written as contiguous CPU copies that share no storage (tied or sliced weights become
    separate tensors, as safetensors requires); each file goes through a temporary name and a
    rename, so a reader never sees half a file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    tmp = folder / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS_NAME)
    for name, text in ((CONFIG_NAME, json.dumps(config, indent=2) + "\n"), (CARD_NAME, card)):
        tmp = folder / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, folder / name)
    return folder

