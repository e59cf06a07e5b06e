"""Tiny random DPAR / entropy-model pairs whose entropies really vary (LlamaGen zero-initialises
the output head, which would make every entropy ln V and leave no threshold boundary)."""
import torch

from autoregressive.models.dpar import DPAR_models
from autoregressive.models.gpt import GPT_models
from entropy_model.entropy import teacher_forced_entropy
from entropy_model.patching import PatchingConfig

VOCAB, CLASSES, GRID = 32, 5, 6
T = GRID * GRID


def random_entropy_model(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT_models["GPT-T"](vocab_size=VOCAB, block_size=T, model_type="uncond")
    torch.nn.init.normal_(model.output.weight, std=2.0)
    torch.nn.init.normal_(model.tok_embeddings.weight, std=1.0)
    return model.eval()


def random_dpar(seed: int = 1, **kwargs):
    torch.manual_seed(seed)
    model = DPAR_models["DPAR-T"](vocab_size=VOCAB, block_size=T, num_classes=CLASSES, **kwargs)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.eval()


def quantile_patching(entropy_model, quantile: float = 0.6, cap: int = 3, seed: int = 5) -> PatchingConfig:
    """tau at an entropy quantile of random sequences, so gates fire on a fair share of tokens."""
    codes = torch.randint(0, VOCAB, (16, T), generator=torch.Generator().manual_seed(seed))
    e = teacher_forced_entropy(entropy_model, codes)[:, 1:]
    return PatchingConfig("entropy", float(e.quantile(quantile)), cap, True)
