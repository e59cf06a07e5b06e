"""Model registries: every model kind is looked up by its exact registry name."""
from autoregressive.models.gpt import GPTConfig, GPT_models, Transformer
from utils.checkpoint import checkpoint_weights, load_checkpoint


def all_models() -> dict:
    from autoregressive.models.dpar import DPAR_models

    return {**GPT_models, **DPAR_models}


def build_model(name: str, **kwargs):
    models = all_models()
    if name not in models:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(models)}")
    return models[name](**kwargs)


def build_model_from_config(name: str, config: dict):
    """Rebuild a model from its registry name and stored config dict."""
    if name.startswith("DPAR"):
        from autoregressive.models.dpar import DPAR, DPARConfig

        return DPAR(DPARConfig(**config))
    if name not in GPT_models:
        raise ValueError(f"unknown model {name!r}")
    return Transformer(GPTConfig(**config))


def model_from_checkpoint(ckpt, strict: bool = True, prefer_ema: bool = False):
    """(path or loaded dict) -> (model in eval mode, args dict). Rebuilds the model from the
    stored registry name and config, then loads the weights strict: the EMA weights when
    prefer_ema and the checkpoint has them (args["weights"] says "ema" or "raw")."""
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
