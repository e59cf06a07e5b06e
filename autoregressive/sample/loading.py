"""Load what sampling needs: the VQ decoder, the GPT or DPAR generator (rebuilt from its
checkpoint's args, from a release folder's config.json, or from --gpt-model for LlamaGen's
released files), and for DPAR the entropy model (checked against the hash the DPAR checkpoint
recorded; a release may bundle it) and the patching rule (the checkpoint's, with inference-time
overrides). Release folders and hub repo ids: autoregressive/models/release.py."""
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn

from autoregressive.models import build_model, model_family, model_from_checkpoint
from autoregressive.models.release import from_pretrained
from entropy_model.patching import GATED_MODES, PatchingConfig, paper_patching, paper_setting
from tokenizer.vq_model import VQModel, load_vq_checkpoint
from utils.checkpoint import checkpoint_weights, load_checkpoint
from utils.identity import check_weights_identity
from utils.release import is_weights_folder, local_folder, looks_like_repo_id

@dataclass
class PatchingOverrides:
    """Inference-time changes to a DPAR checkpoint's patching rule; None keeps the stored value.
    max_patch_length 0 removes the cap."""

    mode: Optional[str] = None
    threshold: Optional[float] = None
    max_patch_length: Optional[int] = None
    row_reset: Optional[bool] = None
    static_length: Optional[float] = None


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 on CPU; 'none' is LlamaGen's name for fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"none": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters to `dtype`; buffers (the RoPE tables) stay float32, as LlamaGen keeps its
    tables outside the module when it casts the model for sampling."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def load_vq(path: str, model_name: str, codebook_size: Optional[int], codebook_embed_dim: Optional[int]) -> VQModel:
    """VQ model in eval mode on CPU; None overrides keep the checkpoint's (or the registry's) values.
    A release folder (or hub repo id) carries its config: overrides must agree with it."""
    if is_release(path):
        model, config = from_pretrained(path)
        if config["kind"] != "vq" or config["model_name"] != model_name:
            raise ValueError(f"--vq-ckpt {path} holds a {config['model_name']}, not a {model_name} tokenizer")
        for flag, value in (("codebook_size", codebook_size), ("codebook_embed_dim", codebook_embed_dim)):
            if value is not None and value != getattr(model.config, flag):
                raise ValueError(f"--{flag.replace('_', '-')} {value} does not match --vq-ckpt {path} "
                                 f"({getattr(model.config, flag)})")
        return model
    overrides = {k: v for k, v in (("codebook_size", codebook_size), ("codebook_embed_dim", codebook_embed_dim))
                 if v is not None}
    return load_vq_checkpoint(path, model_name, **overrides)


def load_generator(
    path: str,
    gpt_model: Optional[str],
    vocab_size: int,
    block_size: Optional[int],
    num_classes: int,
    cls_token_num: int = 1,
    prefer_ema: bool = True,
) -> Tuple[nn.Module, dict]:
    """GPT or DPAR in eval mode on CPU, and its checkpoint args ({} for LlamaGen's files) with
    args["weights"] = "ema" or "raw": the EMA weights when the checkpoint has them and
    prefer_ema, else the trained weights.

    A project checkpoint rebuilds itself from args["gpt_model"] / args["model_config"]
    (--gpt-model, when given, must agree). LlamaGen's released files carry weights only (under
    "model", "module" or "state_dict", or a bare state dict as its FSDP exports): the model is
    --gpt-model with vocab_size, block_size (the token grid) and num_classes. A release folder
    (ours or LlamaGen's Hugging Face format) or hub repo id rebuilds itself from its config.json."""
    if is_release(path):
        return release_generator(path, gpt_model, prefer_ema)
    ckpt = load_checkpoint(path)
    args = ckpt.get("args")
    if isinstance(args, dict) and "gpt_model" in args and "model_config" in args:
        if gpt_model is not None and gpt_model != args["gpt_model"]:
            raise ValueError(f"{path} holds a {args['gpt_model']} model, not {gpt_model}")
        return model_from_checkpoint(ckpt, prefer_ema=prefer_ema)
    if gpt_model is None:
        raise ValueError(f"{path} does not record its model; name it with --gpt-model")
    if model_family(gpt_model).patched:
        raise ValueError(f"{path} does not record its model; DPAR checkpoints must come from this project's trainer")
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"model": ckpt}  # a bare state dict (LlamaGen's --from-fsdp files)
    state, used_ema = checkpoint_weights(ckpt, prefer_ema)
    if block_size is None:
        raise ValueError("a checkpoint without args needs --image-size to fix the token grid")
    model = build_model(gpt_model, vocab_size=vocab_size, block_size=block_size, num_classes=num_classes,
                        cls_token_num=cls_token_num)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit {gpt_model}: {str(e).splitlines()[0]}") from e
    return model.eval(), {"weights": "ema" if used_ema else "raw"}


def is_release(path: str) -> bool:
    """A weights folder (utils/release.py) or, when no such path exists, a hub repo id."""
    return is_weights_folder(path) or looks_like_repo_id(path)


def release_generator(path: str, gpt_model: Optional[str], prefer_ema: bool) -> Tuple[nn.Module, dict]:
    """load_generator for a release: the model and its config.json as checkpoint args (the
    bundled entropy model's folder as args["entropy_model"])."""
    folder = local_folder(path)
    model, config = from_pretrained(folder)
    name = config["model_name"]
    if config["kind"] == "vq":
        raise ValueError(f"--gpt-ckpt {path} holds a VQ tokenizer, not a generator")
    if gpt_model is not None and gpt_model != name:
        raise ValueError(f"{path} holds a {name} model, not {gpt_model}")
    weights = config.get("weights", "raw")
    if not prefer_ema and weights == "ema":
        raise ValueError(f"--raw-weights: {path} holds only its EMA weights (export the raw ones with --weights raw)")
    entropy = config.get("entropy_model") or {}
    args = {"gpt_model": name, "model_config": config["model_config"], "weights": weights,
            "image_size": config.get("image_size"), "patching": config.get("patching"),
            "entropy_model_hash": entropy.get("sha256"), "vq": config.get("vq"),
            "entropy_model": str(folder / entropy["folder"]) if entropy.get("folder") else None}
    return model, {k: v for k, v in args.items() if v is not None}


def check_vq_identity(vq_ckpt: str, ckpt_args: dict) -> None:
    """One-line ValueError when the generator records the tokenizer it was trained on (a
    release's vq.sha256) and --vq-ckpt is another one."""
    expected = (ckpt_args.get("vq") or {}).get("sha256")
    if expected:
        check_weights_identity(local_folder(vq_ckpt) if is_release(vq_ckpt) else vq_ckpt, expected, "--vq-ckpt",
                               "the tokenizer this model's codes come from", shown=vq_ckpt)


SAMPLING_REMEDY = "pass --threshold and --max-patch-length"


def sampling_patching(ckpt_args: dict, overrides: PatchingOverrides) -> PatchingConfig:
    """The DPAR checkpoint's patching rule (args["patching"]) with the overrides applied. A
    checkpoint without a rule, or a switch to a gated mode without --threshold, takes the paper's
    setting for the recorded image size, and refuses in one line at a size without one."""
    stored = ckpt_args.get("patching")
    image_size = ckpt_args.get("image_size", 256)
    if stored is None:
        base = paper_patching(image_size, SAMPLING_REMEDY)
        print(f"note: the checkpoint records no patching rule; using the paper's at {image_size} px ({base.mode}, "
              f"tau {base.threshold}, cap {base.max_patch_length}, row reset)")
    else:
        base = PatchingConfig.from_dict(stored)
    changes = {k: v for k, v in vars(overrides).items() if v is not None}
    if changes.get("max_patch_length") == 0:
        changes["max_patch_length"] = None
    if changes.get("mode") in GATED_MODES and base.threshold is None and "threshold" not in changes:
        changes["threshold"] = paper_setting(image_size, SAMPLING_REMEDY).threshold
    if changes.get("mode", "static") != "static":
        changes.setdefault("static_length", None)  # a stored static pattern does not carry to another mode
    return replace(base, **changes)


def entropy_ckpt_path(path: Optional[str], ckpt_args: dict) -> str:
    """`path` (--entropy-ckpt), else the checkpoint the DPAR checkpoint's training run named, or
    the entropy model a release bundles."""
    if path is not None:
        return path
    recorded = ckpt_args.get("entropy_model")
    if not recorded or not os.path.exists(recorded):
        raise ValueError("this DPAR model patches by entropy: give the entropy model with --entropy-ckpt")
    print(f"entropy model: {recorded} (recorded in the DPAR checkpoint)")
    return recorded


def entropy_model_for_dpar(path: Optional[str], dpar: nn.Module, ckpt_args: dict) -> nn.Module:
    """The frozen entropy model in eval mode on CPU. `path` (--entropy-ckpt: a checkpoint or a
    release folder) defaults to entropy_ckpt_path's; its identity (utils.identity.check_weights_identity)
    must equal the recorded args["entropy_model_hash"] when the checkpoint has one."""
    path = entropy_ckpt_path(path, ckpt_args)
    if not Path(path).exists():
        raise ValueError(f"--entropy-ckpt {path} does not exist")
    expected = ckpt_args.get("entropy_model_hash")
    if expected:
        check_weights_identity(path, expected, "--entropy-ckpt", "the entropy model this DPAR model was trained with")
    model = from_pretrained(path)[0] if is_weights_folder(path) else model_from_checkpoint(path)[0]
    if isinstance(model, VQModel):
        raise ValueError(f"--entropy-ckpt {path} is not an unconditional GPT (the entropy model)")
    config = model.config
    if model_family(model).patched or config.model_type != "uncond":
        raise ValueError(f"--entropy-ckpt {path} is not an unconditional GPT (the entropy model)")
    if (config.vocab_size, config.block_size) != (dpar.config.vocab_size, dpar.config.block_size):
        raise ValueError(f"entropy model (vocab {config.vocab_size}, {config.block_size} tokens) does not match "
                         f"the DPAR model (vocab {dpar.config.vocab_size}, {dpar.config.block_size} tokens)")
    return model
