"""Loads the LlamaGen test vectors and rebuilds their weights by the fixtures' public seed rule."""
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "llamagen"


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / name, weights_only=True)


def rule_state_dict(keys) -> dict:
    state = {}
    for i, (key, shape) in enumerate(keys):
        if key == "quantize.codebook_used":
            state[key] = torch.zeros(shape)
            continue
        w = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + i)) * 0.05
        if "norm" in key and len(shape) == 1:
            w = w + 1.0
        state[key] = w
    return state
