"""Model registries and families: every model is looked up by its exact registry name, and
everything that differs between the GPT baseline and DPAR is asked of its family's record
(`model_family(name or model)`), never of the name."""
from dataclasses import dataclass
from typing import Dict, Union

import torch.nn as nn

from autoregressive.models.dpar import DPAR, DPAR_configs, DPARConfig
from autoregressive.models.gpt import GPT_configs, GPTConfig, Transformer
from utils.checkpoint import checkpoint_weights, load_checkpoint


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """One model family: its registry (name -> the config fields of that size, plain data like
    gpt-fast's transformer_configs), model and config classes, and whether its middle layers run
    over patches (then training and sampling need a patching rule, generation an entropy model
    for the gated modes, and FLOPs a patch count)."""

    name: str
    configs: Dict[str, dict]
    model_class: type
    config_class: type
    patched: bool


GPT_FAMILY = ModelFamily("GPT", GPT_configs, Transformer, GPTConfig, patched=False)
DPAR_FAMILY = ModelFamily("DPAR", DPAR_configs, DPAR, DPARConfig, patched=True)
FAMILIES = (GPT_FAMILY, DPAR_FAMILY)


def all_models() -> dict:
    return {name: sizes for family in FAMILIES for name, sizes in family.configs.items()}


def model_family(model: Union[str, nn.Module]) -> ModelFamily:
    """The family of a registry name or of a model (a torch.compile'd one included)."""
    if isinstance(model, str):
        family = next((f for f in FAMILIES if model in f.configs), None)
        if family is None:
            raise ValueError(f"unknown model {model!r}; choose one of {sorted(all_models())}")
        return family
    module = getattr(model, "_orig_mod", model)
    family = next((f for f in FAMILIES if isinstance(module, f.model_class)), None)
    if family is None:
        names = ", ".join(f.name for f in FAMILIES)
        raise ValueError(f"{type(module).__name__} is not a model of any family ({names})")
    return family


def build_config(name: str, /, **kwargs):
    """The config of registry entry `name` with `kwargs` over its sizes; builds no model."""
    family = model_family(name)
    return family.config_class(**{**family.configs[name], **kwargs})


def build_model(name: str, /, **kwargs) -> nn.Module:
    """The registry model `name` with `kwargs` over its sizes (a stored config dict rebuilds it)."""
    return model_family(name).model_class(build_config(name, **kwargs))


def model_from_checkpoint(ckpt, strict: bool = True, prefer_ema: bool = False):
    """(path or loaded dict) -> (model in eval mode, args dict). Rebuilds the model from the
    stored registry name and config, then loads the weights strict: the EMA weights when
    prefer_ema and the checkpoint has them (args["weights"] says "ema" or "raw")."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    args = ckpt.get("args")
    if not isinstance(args, dict) or "gpt_model" not in args or "model_config" not in args:
        raise ValueError("checkpoint does not record its model (args.gpt_model / args.model_config missing)")
    model = build_model(args["gpt_model"], **args["model_config"])
    weights, used_ema = checkpoint_weights(ckpt, prefer_ema)
    try:
        model.load_state_dict(weights, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not fit {args['gpt_model']}: {str(e).splitlines()[0]}") from e
    return model.eval(), {**args, "weights": "ema" if used_ema else "raw"}
