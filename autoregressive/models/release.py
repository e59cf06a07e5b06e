"""save_pretrained / from_pretrained for every model of the pipeline (GPT, DPAR, the entropy
model, the VQ tokenizer) as a weights folder (utils/release.py: config.json, model.safetensors,
README.md), on a local folder or a hub repo id.

config.json of a release (docs/design.md, "Release format"):
    format "dpar-release", format_version, kind ("gpt" | "dpar" | "vq"), model_name (registry
    name), model_config (the config dataclass as a dict: it alone rebuilds the model), and what
    using the weights needs: image_size, vq {model, sha256, downsample}, weights ("ema" | "raw"),
    source {file, sha256, step, epoch}, training (settings of the run), evaluation (list of
    results; empty: not evaluated); DPAR adds patching (mode, threshold, max_patch_length,
    row_reset, static_length) and entropy_model {sha256, folder (a subfolder holding the entropy
    model's own release, or null)}.

A folder written by LlamaGen's TransformerHF.save_pretrained (config.json with the fields of
LlamaGen's ModelArgs, no "format") loads as the GPT of the same size, weights unchanged.
"""
import dataclasses
from pathlib import Path
from typing import Optional, Tuple, Union

import torch.nn as nn

from autoregressive.models import FAMILIES, build_model, model_family
from autoregressive.models.gpt import GPT_configs, GPTConfig
from tokenizer.vq_model import VQ_ARCHS, VQConfig, VQModel
from utils.release import (CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME, load_weights_strict, local_folder,
                           read_config, write_weights_folder)

KINDS = ("gpt", "dpar", "vq")
ENTROPY_FOLDER = "entropy_model"  # subfolder of a DPAR release holding its entropy model's release
# LlamaGen ModelArgs fields a class-conditional GPT does not use: the text encoder's width and
# LlamaGen's KV-cache sizes (ours are set when sampling starts)
LLAMAGEN_UNUSED_FIELDS = ("caption_dim", "max_batch_size", "max_seq_len")


def model_kind(model: nn.Module) -> str:
    """"vq", or the family's name in lower case ("gpt", "dpar")."""
    module = getattr(model, "_orig_mod", model)
    if isinstance(module, VQModel):
        return "vq"
    return model_family(module).name.lower()


def release_config(model: nn.Module, name: str, **fields) -> dict:
    """The config.json of a release of `model` under registry name `name`, with `fields` added."""
    module = getattr(model, "_orig_mod", model)
    kind = model_kind(module)
    known = VQ_ARCHS if kind == "vq" else next(f.configs for f in FAMILIES if f.name.lower() == kind)
    if name not in known:
        raise ValueError(f"{name!r} is not a {kind} registry name (one of {sorted(known)})")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "model_name": name,
            "model_config": dataclasses.asdict(module.config), **fields}


def save_pretrained(model: nn.Module, folder: Union[str, Path], name: str, card: Optional[str] = None,
                    **fields) -> Path:
    """Write `model` as a release folder: config.json (release_config), model.safetensors (its
    state dict) and README.md (`card`, default model_card of the config). Returns the folder."""
    config = release_config(model, name, **fields)
    module = getattr(model, "_orig_mod", model)
    return write_weights_folder(folder, config, module.state_dict(), card if card is not None else model_card(config))


def from_pretrained(folder_or_repo_id: Union[str, Path]) -> Tuple[nn.Module, dict]:
    """(model in eval mode on CPU, its config.json) from a release folder, a LlamaGen Hugging
    Face folder or a hub repo id. The model is rebuilt from the config and loaded strict; for
    LlamaGen's folders the returned config is ours (kind "gpt", model_name, model_config)."""
    folder = local_folder(folder_or_repo_id)
    config = read_config(folder)
    if "format" not in config and "n_layer" in config and "dim" in config:
        config = llamagen_release_config(config, folder / CONFIG_NAME)
    model = build_from_config(config, folder / CONFIG_NAME)
    load_weights_strict(model, folder / WEIGHTS_NAME, f"the {config['model_name']} of {folder / CONFIG_NAME}")
    return model.eval(), config


def build_from_config(config: dict, path: Path) -> nn.Module:
    """The model a release config describes (random weights); one-line ValueError naming `path`."""
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is neither a {FORMAT} config nor LlamaGen's (format {config.get('format')!r})")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {config['format_version']}; this code reads up to "
                         f"{FORMAT_VERSION} (update the code)")
    kind, name, fields = config.get("kind"), config.get("model_name"), config.get("model_config")
    if kind not in KINDS or not isinstance(name, str) or not isinstance(fields, dict):
        raise ValueError(f"{path} does not name its model (kind one of {KINDS}, model_name, model_config)")
    try:
        if kind == "vq":
            if name not in VQ_ARCHS:
                raise ValueError(f"unknown VQ model {name!r}")
            return VQModel(VQConfig(**fields))
        if model_family(name).name.lower() != kind:
            raise ValueError(f"{name} is not a {kind} model")
        return build_model(name, **fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot build {name}: {str(e).splitlines()[0]}") from None


def llamagen_release_config(fields: dict, path: Path) -> dict:
    """LlamaGen's ModelArgs (TransformerHF's config.json) as our release config: the GPT
    registry entry of the same depth, heads and width, the ModelArgs values as its config."""
    if fields.get("model_type", "c2i") != "c2i":
        raise ValueError(f"{path}: model_type {fields['model_type']!r} is not supported (class-conditional c2i only)")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(fields) - known - set(LLAMAGEN_UNUSED_FIELDS))
    if unknown:
        raise ValueError(f"{path}: LlamaGen config fields this GPT does not have: {', '.join(unknown)}")
    try:
        config = GPTConfig(**{k: v for k, v in fields.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {str(e).splitlines()[0]}") from None
    size = (config.n_layer, config.n_head, config.dim)
    name = next((n for n, c in GPT_configs.items() if (c["n_layer"], c["n_head"], c["dim"]) == size), None)
    if name is None:
        raise ValueError(f"{path}: no GPT registry entry has {size[0]} layers, {size[1]} heads, dim {size[2]}")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "gpt", "model_name": name,
            "model_config": dataclasses.asdict(config), "source": {"format": "LlamaGen TransformerHF"}}


# ---------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------
KIND_TITLES = {"gpt": "class-conditional GPT (LlamaGen layout)", "dpar": "DPAR class-conditional generator",
               "vq": "VQ image tokenizer (LlamaGen layout)"}


def model_card(config: dict) -> str:
    """README.md of a release, derived from its config.json only (the two cannot disagree):
    hub metadata, what the model is, how to load and sample it, the training settings, the
    entropy model and VQ it needs, and what it was evaluated on ("not evaluated" when nothing)."""
    kind, name = config["kind"], config["model_name"]
    mc = config["model_config"]
    title = KIND_TITLES[kind] + (" run unconditionally: an entropy model" if mc.get("model_type") == "uncond" else "")
    lines = ["---", "tags:", "- dpar", "- image-generation", "- safetensors"]
    if config.get("license"):
        lines.append(f"license: {config['license']}")
    lines += ["---", "", f"# {name}: {title}", ""]
    facts = [("registry name", name), ("image size", config.get("image_size")), ("weights", config.get("weights"))]
    if kind != "vq":
        facts += [("vocabulary", mc.get("vocab_size")), ("tokens per image", mc.get("block_size")),
                  ("classes", mc.get("num_classes") if mc.get("model_type") != "uncond" else "none (unconditional)")]
    source = config.get("source") or {}
    facts += [("exported from", f"{source.get('file')} (sha256 {source.get('sha256')})" if source.get("sha256")
               else source.get("format")),
              ("step", source.get("step")), ("epoch", source.get("epoch"))]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts if v is not None] + [""]
    if kind == "dpar":
        p = config.get("patching") or {}
        cap = p.get("max_patch_length") if p.get("max_patch_length") is not None else "none"
        lines += ["## Patching", "", f"mode {p.get('mode')}, threshold tau {p.get('threshold')} nats, "
                  f"P_max {cap}, row reset {'on' if p.get('row_reset') else 'off'}"
                  + (f", static length {p['static_length']}" if p.get("static_length") is not None else "") + ".", ""]
        ent = config.get("entropy_model") or {}
        where = (f"bundled in `{ent['folder']}/`" if ent.get("folder")
                 else "not bundled: pass it with `--entropy-ckpt`")
        lines += ["## Entropy model", "", f"sha256 {ent.get('sha256')}; {where}. Sampling refuses an entropy "
                  f"model with another hash.", ""]
    vq = config.get("vq") or {}
    if kind != "vq" and vq:
        lines += ["## Tokenizer", "", f"{vq.get('model')} (downsample {vq.get('downsample')}), checkpoint sha256 "
                  f"{vq.get('sha256') or 'not recorded'}: the codes this model predicts are that tokenizer's.", ""]
    lines += ["## Use", "", "```python", "from autoregressive.models.release import from_pretrained",
              "model, config = from_pretrained(\"PATH_OR_REPO_ID\")", "```", ""]
    if kind != "vq" and mc.get("model_type") != "uncond":
        lines += ["```bash", "python sample_c2i.py --gpt-ckpt PATH --vq-ckpt VQ_CKPT --class-labels 207 360 "
                  "--out grid.png", "```", ""]
    training = config.get("training") or {}
    if training:
        lines += ["## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in training.items()] + [""]
    evaluation = config.get("evaluation") or []
    lines += ["## Evaluation", ""]
    lines += [f"- {e}" for e in evaluation] if evaluation else ["Not evaluated: no metric has been measured on "
                                                               "these weights."]
    return "\n".join(lines) + "\n"
