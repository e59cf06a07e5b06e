"""The training loss (autoregressive/models/loss.py): the chunked loss with every term on against
a plain reference (autograd over the whole float64 logits), through both model families too,
and LossConfig read from the trainer's flags."""
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from autoregressive.models.dpar import DPAR_models
from autoregressive.models.gpt import GPT_models
from autoregressive.models.loss import LossConfig, chunked_loss
from autoregressive.train.args import build_parser
from entropy_model.patching import PatchingConfig

V, T, GRID = 40, 16, 4


def reference_loss(logits: torch.Tensor, targets: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """Each term written plainly over the whole logits (N, V)."""
    loss = F.cross_entropy(logits, targets)
    loss = loss + config.z_loss * torch.logsumexp(logits, dim=-1).square().mean()
    return loss


def every_term_on() -> LossConfig:
    """Every LossConfig field at a nonzero value, so that each term counts in the tests."""
    config = LossConfig(**{f.name: 0.3 for f in fields(LossConfig)})
    assert all(getattr(config, f.name) != f.default for f in fields(LossConfig))  # the precondition
    return config


@pytest.mark.parametrize("terms", ["cross-entropy", "every term"])
def test_chunked_loss_matches_the_float64_reference(terms):
    config = LossConfig() if terms == "cross-entropy" else every_term_on()
    g = torch.Generator().manual_seed(0)
    N, dim, vocab = 37, 24, 50  # 37 rows in chunks of 8: a ragged last chunk
    h = torch.randn(N, dim, generator=g, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (N,), generator=g)
    loss = chunked_loss(h, weight, targets, config, chunk_rows=8)
    (2.5 * loss).backward()  # a non-unit upstream gradient
    h64, w64 = h.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = reference_loss(h64 @ w64.t(), targets, config)
    (2.5 * ref).backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.allclose(h.grad.double(), h64.grad, atol=1e-6)
    assert torch.allclose(weight.grad.double(), w64.grad, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt", "dpar"])
def test_models_train_on_the_configured_loss(family):
    """model(..., targets, loss_config) is the reference loss of the model's own logits, and so are
    its gradients."""
    torch.manual_seed(0)
    codes, cond = torch.randint(0, V, (3, T)), torch.randint(0, 4, (3,))
    if family == "gpt":
        model, extra = GPT_models["GPT-T"](vocab_size=V, block_size=T, num_classes=4).eval(), ()
    else:
        model = DPAR_models["DPAR-T"](vocab_size=V, block_size=T, num_classes=4).eval()
        extra = (PatchingConfig("static", None, 2, True).lengths(None, GRID, shape=(3, T)),)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    config = every_term_on()
    _, loss = model(codes[:, :-1], cond, *extra, targets=codes, loss_config=config)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(codes[:, :-1], cond, *extra)
    ref = reference_loss(logits.flatten(0, 1), codes.flatten(), config)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-5), name


def test_loss_config_comes_from_the_flags_of_the_same_names():
    """Every LossConfig field is a train_c2i.py flag whose default turns the term off; from_flags
    reads the values given."""
    parser = build_parser()
    defaults = vars(parser.parse_args(["--code-path", "store"]))
    assert LossConfig.from_flags(defaults) == LossConfig()
    given = [arg for f in fields(LossConfig) for arg in (f"--{f.name.replace('_', '-')}", "0.3")]
    assert LossConfig.from_flags(vars(parser.parse_args(["--code-path", "store", *given]))) == every_term_on()


def test_every_term_stays_in_the_one_compiled_training_graph():
    """With every term on, the training forward is still one graph without breaks, and the
    compiled loss and gradients equal the eager ones."""
    from autoregressive.train.model import compile_model

    torch.manual_seed(0)
    codes, cond = torch.randint(0, V, (3, T)), torch.randint(0, 4, (3,))
    config = every_term_on()
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPT_models["GPT-T"](vocab_size=V, block_size=T, num_classes=4, token_dropout_p=0.0,
                                    resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0).train()
        torch.nn.init.normal_(model.output.weight, std=0.5)
        if compiled:
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(model)(codes[:, :-1], cond, targets=codes, loss_config=config)
            assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
            compile_model(model, "model", backend="aot_eager")
        _, loss = model(codes[:, :-1], cond, targets=codes, loss_config=config)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch._dynamo.reset()
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert torch.allclose(eager, compiled, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(eager_grads, compiled_grads))
