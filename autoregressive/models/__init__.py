"""Model registries: every model kind is looked up by its exact registry name."""
from autoregressive.models.gpt import GPT_models, GPTConfig, Transformer


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
