"""Inductor (real code generation, as on the fast path) on the GPT decode step: every graph is
compiled by inductor, a second generation with other classes and seeds compiles nothing, and
the tokens equal eager ones. Inductor compiles take tens of seconds on a small CPU, so the suite
keeps this one smallest case (one layer, 16 tokens); benchmarks/compiler_check.py compiles the
DPAR decode steps and the whole-model training steps (GPT, DPAR packed) with inductor, and
times a second process on the same compile cache."""
import torch
from torch._dynamo.utils import counters

from autoregressive.models.generate import Decoding, generate
from autoregressive.models.gpt import GPTConfig, Transformer

GRID, VOCAB, CLASSES = 4, 32, 5
T = GRID * GRID


def one_layer_gpt():
    torch.manual_seed(0)
    model = Transformer(GPTConfig(n_layer=1, n_head=4, dim=64, vocab_size=VOCAB, block_size=T, num_classes=CLASSES))
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.eval()


def test_gpt_decode_step_under_inductor_compiles_once_and_equals_eager():
    model = one_layer_gpt()
    fast, eager = Decoding(compile=True, backend="inductor", read_block=8), Decoding(read_block=8)
    kwargs = dict(cfg_scale=2.0, top_k=8, top_p=0.95)
    torch._dynamo.reset()
    counters.clear()
    # no profile of earlier runs in the compile cache may change which sizes are dynamic
    with torch._dynamo.config.patch(automatic_dynamic_local_pgo=False):
        generate(model, torch.tensor([0, 1, 2]), T, row_seeds=[1, 2, 3], decoding=fast, **kwargs)
        graphs = counters["stats"]["unique_graphs"]
        inductor = counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"]
        assert 1 <= graphs <= 2 and inductor == graphs  # inductor generated (or loaded) the code of every graph
        cond, seeds = torch.tensor([4, 3, 1]), [7, 8, 9]
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = generate(model, cond, T, row_seeds=seeds, decoding=fast, **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs
    reference = generate(model, cond, T, row_seeds=seeds, decoding=eager, **kwargs)
    assert torch.equal(compiled.tokens, reference.tokens)
    assert compiled.tokens.unique().numel() > 4  # real draws, not one repeated token
    torch._dynamo.reset()
