"""export_release.py: a training checkpoint (file, FSDP directory, or a run folder's newest) as a
release folder (autoregressive/models/release.py, docs/design.md "Release format"), optionally
pushed to the Hugging Face hub.

    python export_release.py results/dpar/checkpoints/0400000.pt releases/DPAR-L --vq-ckpt vq_ds16_c2i.pt
    python export_release.py results/dpar releases/DPAR-L --evaluated-on "FID-50k 2.93 (ImageNet 256, cfg 2.0)"
    python export_release.py results/dpar releases/DPAR-L --push-to-hub user/dpar-l-256
    python export_release.py c2i_L_384.pt releases/GPT-L-384 --gpt-model GPT-L --image-size 384   # LlamaGen's

A DPAR release records its patching rule and entropy model hash and bundles the entropy model
(--entropy-ckpt, default the file the training run named) in entropy_model/, so that
`sample_c2i.py --gpt-ckpt releases/DPAR-L --vq-ckpt VQ` needs nothing else. The model card
states the training settings, step and epoch, the entropy model and tokenizer, and what the
weights were evaluated on: "not evaluated" unless --evaluated-on says otherwise.
"""
import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from autoregressive.models import all_models, model_family, model_from_checkpoint
from autoregressive.models.release import ENTROPY_FOLDER, from_pretrained, model_kind, save_pretrained
from autoregressive.sample.loading import load_generator
from entropy_model.patching import GATED_MODES
from tokenizer.vq_model import VQ_models, VQConfig, VQModel, check_state_dict, vq_config
from utils.checkpoint import checkpoint_weights, is_dcp_checkpoint, load_checkpoint, newest_readable
from utils.cli import HelpFormatter
from utils.identity import check_weights_identity, checkpoint_sha256
from utils.release import is_weights_folder, push_folder

# settings of the run that the model card and config.json state (those the checkpoint's args hold)
TRAINING_FIELDS = ("gpt_model", "vq_model", "unconditional", "image_size", "global_batch_size", "epochs", "max_steps",
                   "total_steps", "lr", "lr_schedule", "warmup_steps", "min_lr", "weight_decay", "beta1", "beta2",
                   "max_grad_norm", "dropout_p", "token_dropout_p", "class_dropout_prob", "drop_path_rate", "ema",
                   "ema_decay", "mixed_precision", "data_parallel", "world_size", "seed", "achieved_compression")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
VQ_CODEBOOK = "quantize.embedding.weight"  # the key that tells a tokenizer's state dict from a generator's


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a training checkpoint (GPT, DPAR, entropy model or VQ) as a "
                                            "release folder: config.json, model.safetensors and a model card.",
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="checkpoint file, FSDP checkpoint directory, or run folder (its newest "
                                      "readable checkpoint)")
    p.add_argument("out", help="release folder to write (must not exist or be empty)")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="which weights: the EMA (--ema runs), the trained ones, or auto (EMA when present)")
    p.add_argument("--entropy-ckpt", default=None,
                   help="DPAR: the entropy model to bundle in entropy_model/ (default: the file the training run "
                        "named, when it exists); its sha256 must be the one the checkpoint records")
    p.add_argument("--no-entropy-model", action="store_true",
                   help="DPAR: record the entropy model's hash only, do not bundle it")
    p.add_argument("--vq-ckpt", default=None,
                   help="the tokenizer the codes came from, recorded by sha256 (default: the hash in the training "
                        "code store's manifest, when readable)")
    p.add_argument("--vq-model", choices=sorted(VQ_models), default=None,
                   help="tokenizer registry name recorded with the hash (default: the code store's, else VQ-16)")
    p.add_argument("--evaluated-on", action="append", default=None, metavar="TEXT",
                   help="an evaluation of these weights for the model card, e.g. 'FID-50k 2.93 (ImageNet 256, cfg "
                        "2.0)' (repeatable; default: the card says not evaluated)")
    p.add_argument("--license", default=None, help="license named in the model card's metadata")
    g = p.add_argument_group("LlamaGen's released checkpoints (they record no config)")
    g.add_argument("--gpt-model", choices=sorted(all_models()), default=None,
                   help="registry name of a GPT checkpoint without args (LlamaGen's c2i files)")
    g.add_argument("--image-size", type=int, default=None, help="image size that checkpoint was trained at")
    g.add_argument("--vocab-size", type=int, default=16384, help="its vocabulary (LlamaGen's VQ-16 codebook)")
    g.add_argument("--num-classes", type=int, default=1000, help="its classes (ImageNet)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="upload the folder to this hub repo (created if missing; needs huggingface-cli login or "
                        "HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    return p


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint, or the newest readable one of a run folder."""
    if path.is_dir() and (path / "checkpoints").is_dir() and not is_dcp_checkpoint(path):
        newest, _ = newest_readable(path / "checkpoints")
        if newest is None:
            raise ValueError(f"run folder {path} has no readable checkpoint")
        return newest
    if not path.exists():
        raise ValueError(f"checkpoint not found: {path}")
    return path


def training_settings(args: dict) -> dict:
    return {k: args[k] for k in TRAINING_FIELDS if args.get(k) is not None}


def choose_weights(ckpt: dict, choice: str, path: Path) -> bool:
    """Whether to export the EMA weights; --weights ema refuses a checkpoint without them."""
    has_ema = isinstance(ckpt.get("ema"), dict)
    if choice == "ema" and not has_ema:
        raise ValueError(f"--weights ema: {path} holds no EMA weights (the run did not use --ema)")
    return has_ema and choice != "raw"


def load_exported_model(ckpt: dict, use_ema: bool, path: Path, cli: argparse.Namespace) -> tuple:
    """(model, registry name) of the checkpoint's weights: rebuilt from its args, or for
    LlamaGen's released files (no config inside) from --vq-model, or --gpt-model with
    --image-size, --vocab-size and --num-classes."""
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if "gpt_model" in args and isinstance(args.get("model_config"), dict):
        if cli.gpt_model is not None and cli.gpt_model != args["gpt_model"]:
            raise ValueError(f"{path} holds a {args['gpt_model']} model, not {cli.gpt_model}")
        model, info = model_from_checkpoint(ckpt, prefer_ema=use_ema)
        return model, info["gpt_model"]
    weights, _ = checkpoint_weights(ckpt, use_ema)
    if VQ_CODEBOOK in weights:  # a VQ tokenizer, ours (args) or LlamaGen's
        name = args.get("vq_model") or cli.vq_model or "VQ-16"
        config = VQConfig(**args["model_config"]) if isinstance(args.get("model_config"), dict) else vq_config(name)
        model = VQModel(config)
        try:
            check_state_dict(model, weights, name)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        model.load_state_dict(weights, strict=True)
        return model.eval(), name
    if cli.gpt_model is None or cli.image_size is None:
        raise ValueError(f"{path} does not record its model (LlamaGen's released files); name it with --gpt-model "
                         f"and --image-size")
    downsample = vq_config(cli.vq_model or "VQ-16").downsample_factor
    if cli.image_size % downsample:
        raise ValueError(f"--image-size {cli.image_size} is not a multiple of the tokenizer's downsampling "
                         f"{downsample}")
    model, _ = load_generator(str(path), cli.gpt_model, cli.vocab_size, (cli.image_size // downsample) ** 2,
                              cli.num_classes, prefer_ema=use_ema)
    return model, cli.gpt_model


def tokenizer_record(args: argparse.Namespace, ckpt_args: dict) -> dict:
    """{model, sha256, downsample} of the tokenizer the training codes came from: --vq-ckpt's
    identity, checked against the code store manifest's when that one is readable."""
    manifest = {}
    store = Path(str(ckpt_args.get("code_path", ""))) / "manifest.json"
    if ckpt_args.get("code_path") and store.is_file():
        manifest = json.loads(store.read_text())
    recorded = manifest.get("tokenizer_hash") if SHA256.match(str(manifest.get("tokenizer_hash"))) else None
    sha = recorded
    if args.vq_ckpt:
        sha = check_weights_identity(args.vq_ckpt, recorded, "--vq-ckpt",
                                     f"the tokenizer of the training code store {store.parent}")
    name = args.vq_model or (manifest.get("tokenizer") if manifest.get("tokenizer") in VQ_models else "VQ-16")
    return {"model": name, "sha256": sha, "downsample": ckpt_args.get("downsample_size")}


def entropy_source(args: argparse.Namespace, ckpt_args: dict) -> Optional[Path]:
    """The entropy model checkpoint to bundle, or None."""
    if args.no_entropy_model:
        return None
    if args.entropy_ckpt:
        if not Path(args.entropy_ckpt).exists():
            raise ValueError(f"--entropy-ckpt {args.entropy_ckpt} does not exist")
        return Path(args.entropy_ckpt)
    named = ckpt_args.get("entropy_model")
    return Path(named) if named and Path(named).exists() else None


def export_entropy_model(path: Path, expected: Optional[str], out: Path) -> str:
    """Write the entropy model at `path` (checkpoint or release) as out/entropy_model/; returns
    its identity, which must equal the DPAR checkpoint's record when it has one."""
    identity = check_weights_identity(path, expected, "--entropy-ckpt",
                                      "the entropy model this DPAR model was trained with")
    if is_weights_folder(path):
        model, config = from_pretrained(path)
        name, source, training = config["model_name"], config.get("source"), config.get("training")
    else:
        model, model_args = model_from_checkpoint(path)
        name, training = model_args["gpt_model"], training_settings(model_args)
        source = {"file": path.name, "sha256": identity}
    if model_kind(model) != "gpt" or model.config.model_type != "uncond":
        raise ValueError(f"--entropy-ckpt {path} is not an unconditional GPT (the entropy model)")
    save_pretrained(model, out / ENTROPY_FOLDER, name, weights="raw", source=source, training=training or {},
                    evaluation=[])
    return identity


def export(args: argparse.Namespace) -> Path:
    """Write the release folder (built under a temporary name, renamed when complete: a failed
    export leaves nothing); returns it."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose a new release folder")
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    try:
        write_release(args, tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def write_release(args: argparse.Namespace, out: Path) -> None:
    source = resolve_checkpoint(Path(args.checkpoint))
    ckpt = load_checkpoint(source)
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"model": ckpt}  # a bare state dict (LlamaGen's --from-fsdp files)
    ckpt_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    use_ema = choose_weights(ckpt, args.weights, source)
    model, name = load_exported_model(ckpt, use_ema, source, args)
    fields = {
        "image_size": ckpt_args.get("image_size", args.image_size), "weights": "ema" if use_ema else "raw",
        "source": {"file": source.name, "sha256": checkpoint_sha256(source), "step": ckpt.get("step"),
                   "epoch": ckpt.get("epoch")},
        "training": training_settings(ckpt_args), "evaluation": list(args.evaluated_on or []),
        **({"license": args.license} if args.license else {}),
    }
    if not isinstance(model, VQModel):
        fields["vq"] = tokenizer_record(args, ckpt_args)
    if not isinstance(model, VQModel) and model_family(model).patched:
        fields.update(dpar_fields(args, ckpt_args, out))
    elif args.entropy_ckpt or args.no_entropy_model:
        raise ValueError(f"--entropy-ckpt and --no-entropy-model apply to DPAR checkpoints, not {name}")
    save_pretrained(model, out, name, **fields)


def dpar_fields(args: argparse.Namespace, ckpt_args: dict, out: Path) -> dict:
    """patching and entropy_model of a DPAR release (bundling the entropy model when there is one)."""
    patching = ckpt_args.get("patching")
    if not isinstance(patching, dict):
        raise ValueError("the DPAR checkpoint records no patching rule (args.patching); it cannot be released")
    expected = ckpt_args.get("entropy_model_hash")
    bundle = entropy_source(args, ckpt_args) if patching.get("mode") in GATED_MODES else None
    if bundle is not None:
        expected = export_entropy_model(bundle, expected, out)
    return {"patching": patching,
            "entropy_model": {"sha256": expected, "folder": ENTROPY_FOLDER if bundle is not None else None}}


def describe(out: Path) -> str:
    config = json.loads((out / "config.json").read_text())
    entropy = config.get("entropy_model") or {}
    bundled = f", entropy model in {out / entropy['folder']}" if entropy.get("folder") else ""
    evaluated = "evaluated" if config.get("evaluation") else "not evaluated"
    line = f"wrote {out}: {config['model_name']} ({config['weights']} weights, {evaluated}{bundled})"
    if "vq" in config and not config["vq"].get("sha256"):
        line += "\nnote: the tokenizer's hash is not recorded (pass --vq-ckpt): sampling cannot check the VQ"
    return line


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        out = export(args)
        print(describe(out))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    if args.push_to_hub:
        try:
            print(f"pushed to {push_folder(out, args.push_to_hub, private=args.private)}")
        except Exception as e:  # the hub's errors (credentials, network, permissions) vary by version
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: push to {args.push_to_hub} failed ({first}); the release is complete in {out}",
                  file=sys.stderr)
            raise SystemExit(1)
