"""Whole-model compile of the training step (GPT and DPAR): one graph without breaks, a bounded
number of graphs over changing patch layouts, no host-device synchronisation in forward and
backward, and compiled loss and gradients equal to eager ones. aot_eager keeps this fast on
the CPU (graph capture and the autograd split, no code generation); the GPU check compiles the
same graphs with inductor."""
import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from autoregressive.models.dpar import DPAR_models, PatchLayout, build_patch_layout
from autoregressive.models.gpt import GPT_models
from autoregressive.train.data import TrainBatch
from autoregressive.train.model import compile_model
from entropy_model.patching import patch_lengths_from_starts, patch_starts

T, W, V, CLASSES = 64, 8, 48, 5
NO_DROPOUT = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
aten = torch.ops.aten


def dpar(**kwargs):
    torch.manual_seed(0)
    model = DPAR_models["DPAR-T"](vocab_size=V, block_size=T, num_classes=CLASSES, pack_multiple=16, **kwargs)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.train()


def gpt(**kwargs):
    torch.manual_seed(0)
    model = GPT_models["GPT-T"](vocab_size=V, block_size=T, num_classes=CLASSES, **kwargs)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.train()


def batch(seed: int, B: int = 4):
    """Random codes, classes and patch lengths (B, M) from random entropies; the threshold
    varies with the seed, so batches differ in patch counts and packed lengths."""
    g = torch.Generator().manual_seed(seed)
    threshold = 3.0 + 5.0 * torch.rand((), generator=g).item()
    lengths = patch_lengths_from_starts(patch_starts(torch.rand(B, T, generator=g) * 10, threshold, 4, W))
    codes = torch.randint(0, V, (B, T), generator=g)
    return codes, torch.randint(0, CLASSES, (B,), generator=g), lengths


def loss_and_grads(model, codes, cond, *layout, plain=False):
    """The trainer's call by default: the chunked loss without logits; plain: F.cross_entropy
    of the logits."""
    model.zero_grad(set_to_none=True)
    if plain:
        logits, _ = model(codes[:, :-1], cond, *layout)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten())
    else:
        _, loss = model(codes[:, :-1], cond, *layout, targets=codes)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a, b, atol=1e-5):
    assert torch.allclose(a[0], b[0], atol=atol, rtol=1e-5), (a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], atol=atol, rtol=1e-4), name


# --------------------------------------------------------------------------------------
# One graph, no breaks
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [True, False])
def test_dpar_training_forward_is_one_graph(packed):
    model = dpar(drop_path_rate=0.1)  # LlamaGen's dropouts plus stochastic depth: the real training graph
    codes, cond, lengths = batch(0)
    layout = build_patch_layout(lengths, model.config, packed=packed)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(codes[:, :-1], cond, layout, targets=codes)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()


def test_gpt_training_forward_is_one_graph():
    model = gpt(drop_path_rate=0.1)
    codes, cond, _ = batch(0)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(codes[:, :-1], cond, targets=codes)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# Bounded graphs and compiled == eager
# --------------------------------------------------------------------------------------
def test_dpar_whole_model_compile_matches_eager_without_recompiles():
    """Layouts reach the model as the trainer moves them (TrainBatch.to marks their sizes
    dynamic): the first batch compiles the one graph that serves every packed length; ten more
    batches with new layouts compile nothing, and every step's loss and gradients equal the
    eager model's."""
    eager, compiled = dpar(**NO_DROPOUT), dpar(**NO_DROPOUT)
    torch._dynamo.reset()
    counters.clear()
    compile_model(compiled, "model", backend="aot_eager")

    def trainer_layout(lengths):
        layout = build_patch_layout(lengths, compiled.config, packed=True)
        return TrainBatch({"patch_lengths": layout}, 0, 0).to(torch.device("cpu")).inputs["patch_lengths"]

    codes, cond, lengths = batch(0)
    first = trainer_layout(lengths)
    assert_close(loss_and_grads(compiled, codes, cond, first), loss_and_grads(eager, codes, cond, first))
    assert counters["stats"]["unique_graphs"] == 1
    slots, counts = set(), set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(1, 11):
            codes, cond, lengths = batch(seed)
            layout = trainer_layout(lengths)
            slots.add(layout.n_slots)
            counts.add(tuple((lengths > 0).sum(-1).tolist()))
            assert_close(loss_and_grads(compiled, codes, cond, layout), loss_and_grads(eager, codes, cond, layout))
    assert len(counts) == 10 and len(slots - {first.n_slots}) >= 2  # new layouts and packed lengths
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_gpt_whole_model_compile_matches_eager_without_recompiles():
    eager, compiled = gpt(**NO_DROPOUT), gpt(**NO_DROPOUT)
    torch._dynamo.reset()
    counters.clear()
    compile_model(compiled, "model", backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            codes, cond, _ = batch(seed)
            assert_close(loss_and_grads(compiled, codes, cond), loss_and_grads(eager, codes, cond))
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# No host-device synchronisation in forward + backward
# --------------------------------------------------------------------------------------
SYNC_OPS = {aten.nonzero, aten._local_scalar_dense, aten.item, aten.masked_select, aten.repeat_interleave,
            aten.unique_consecutive, aten._unique2}


class OpRecorder(TorchDispatchMode):
    """Records every aten op; flags those that make the host wait for the device (data-dependent
    output sizes or values read on the host), boolean-mask indexing included."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        self.ops.add(packet)
        boolean_index = packet in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1])
        if packet in SYNC_OPS or boolean_index:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def test_recorder_catches_syncs():
    x = torch.randn(8)
    with OpRecorder() as rec:
        x[x > 0].sum().item()
    assert any("index" in s for s in rec.syncs) and any("_local_scalar_dense" in s for s in rec.syncs)


@pytest.mark.parametrize("kind", ["dpar-packed", "dpar-padded", "gpt"])
def test_no_sync_ops_in_forward_and_backward(kind):
    codes, cond, lengths = batch(1)
    if kind == "gpt":
        model, extra = gpt(drop_path_rate=0.1), ()
    else:
        model = dpar(drop_path_rate=0.1)
        extra = (build_patch_layout(lengths, model.config, packed=kind == "dpar-packed"),)
        assert isinstance(extra[0], PatchLayout)
    with OpRecorder() as rec:
        _, loss = model(codes[:, :-1], cond, *extra, targets=codes)
        loss.backward()
    assert aten.mm in rec.ops and aten.embedding_dense_backward in rec.ops  # forward and backward were recorded
    if kind != "gpt":
        assert aten.index_add in rec.ops  # DPAR's pooling and broadcasting
    assert rec.syncs == []


# --------------------------------------------------------------------------------------
# The trainer's loss (its float64 reference: tests/test_loss.py)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dpar", "gpt"])
def test_training_loss_equals_the_logits_path(kind):
    """The chunked loss (targets given) gives the loss and gradients of F.cross_entropy of the
    logits, in float32 and under bf16 autocast."""
    codes, cond, lengths = batch(2)
    model = dpar(**NO_DROPOUT) if kind == "dpar" else gpt(**NO_DROPOUT)
    extra = (build_patch_layout(lengths, model.config),) if kind == "dpar" else ()
    plain = loss_and_grads(model, codes, cond, *extra, plain=True)
    assert_close(loss_and_grads(model, codes, cond, *extra), plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = loss_and_grads(model, codes, cond, *extra)
        plain = loss_and_grads(model, codes, cond, *extra, plain=True)
    assert_close(chunked, plain, atol=2e-2)


# --------------------------------------------------------------------------------------
# The trainer: compile scope and steady-state speed in the log
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_parallelize_compiles_the_chosen_scope(scope):
    from argparse import Namespace

    from autoregressive.train.model import parallelize, transformer_blocks
    from utils.distributed import DistInfo

    model = dpar()
    args = Namespace(activation_checkpointing=False, compile=True, compile_scope=scope, data_parallel="ddp")
    module = parallelize(model, args, DistInfo(0, 1, 0, torch.device("cpu")))
    assert module is model and list(model.state_dict()) == list(dpar().state_dict())  # keys unchanged
    assert (model._compiled_call_impl is not None) == (scope == "model")
    assert all((b._compiled_call_impl is not None) == (scope == "blocks") for b in transformer_blocks(model))


def test_log_speed_leaves_out_the_warmup(tmp_path):
    """A slow first step (compilation) is timed apart: the window that holds it is marked
    "warmup", and the first window after the warm-up counts only the steps after it."""
    import json
    import time
    from argparse import Namespace

    from autoregressive.train.data import TrainBatch
    from autoregressive.train.logger import TrainLogger
    from utils.distributed import DistInfo

    args = Namespace(log_every=2, speed_warmup_steps=3, wandb=False, peak_tflops=1.0)
    logger = TrainLogger(tmp_path, args, DistInfo(0, 1, 0, torch.device("cpu")), 6, (1000, 0))
    one = torch.ones(())
    for step in range(1, 7):
        time.sleep(0.4 if step == 1 else 0.01)  # step 1 "compiles"
        logger.update(step, 0, 1e-4, one * step, one, one, [TrainBatch({}, tokens=64, images=4)])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert [r.get("warmup", False) for r in log] == [True, False, False]
    assert log[0]["steps_per_s"] < 6 < 20 < log[1]["steps_per_s"]  # window 2 holds step 4 only, after the warm-up
    for r in log:
        assert r["images_per_s"] == pytest.approx(4 * r["steps_per_s"]) and r["tokens_per_s"] == pytest.approx(
            64 * r["steps_per_s"])
    assert log[1]["loss"] == 3.5 and log[2]["loss"] == 5.5  # losses still cover every step


def test_training_graph_is_cacheable_across_processes():
    """The AOTAutograd cache (a second process loads the compiled forward and backward) accepts
    the training graph only with custom autograd Functions allowed, which compile_model does:
    without it the chunked loss alone makes every training compile bypass the cache."""
    from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache, check_cacheable

    captured = []

    def capture(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    model = dpar(**NO_DROPOUT)
    codes, cond, lengths = batch(0)
    layout = build_patch_layout(lengths, model.config, packed=True)
    torch._dynamo.reset()
    torch.compile(model, backend=capture, fullgraph=True)(codes[:, :-1], cond, layout, targets=codes)
    torch._dynamo.reset()
    (graph,) = captured
    config = torch._functorch.config
    with config.patch(autograd_cache_allow_custom_autograd_functions=False):
        with pytest.raises(BypassAOTAutogradCache, match="FunctionCtx|autograd"):
            check_cacheable(graph)  # the precondition: the chunked loss is what the cache refuses
    with config.patch(autograd_cache_allow_custom_autograd_functions=False):
        compile_model(torch.nn.Linear(2, 2), "model", backend="eager")
        assert config.autograd_cache_allow_custom_autograd_functions
        check_cacheable(graph)
