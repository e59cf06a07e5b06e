"""Static-shape decoding: the per-step patching rule against the whole-sequence rule, compiled
steps (fullgraph, no recompiles, same tokens as eager), host syncs per step, incremental DPAR
against the reference path in every patching mode, and batch-composition invariance."""
import inspect
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autoregressive.models.generate import (
    Decoding,
    Sampling,
    draw_uniforms,
    fast_decoding,
    generate,
    generate_dpar,
    generate_gpt,
    patch_group,
    reference_generate_dpar,
)
from autoregressive.models.gpt import GPT_models
from autoregressive.models.modules import read_length
from dpar_helpers import CLASSES, GRID, T, VOCAB, quantile_patching, random_dpar, random_entropy_model
from entropy_model.entropy import teacher_forced_entropy
from entropy_model.patching import PatchingConfig, StepRule, quantize_entropy


# --------------------------------------------------------------------------------------
# The per-step patching rule equals the whole-sequence rule
# --------------------------------------------------------------------------------------
def discrete_entropies(B: int, T: int, seed: int) -> torch.Tensor:
    """fp16-representable entropies drawn from 12 levels, so that equal values (ties with a
    threshold taken from them) are frequent."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.linspace(0.5, 9.5, 12).half().float()
    return levels[torch.randint(0, 12, (B, T), generator=g)]


def step_by_step(rule: StepRule, entropy, B: int, T: int) -> torch.Tensor:
    """Run the per-step rule over T tokens the way generation does. -> (B, T) bool starts."""
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[:, 0] = True
    patch_start = torch.zeros(B, dtype=torch.long)
    for i in range(1, T):
        e, prev = (entropy[:, i], entropy[:, i - 1]) if entropy is not None else (None, None)
        opens = rule.opens(i, e, prev, i - patch_start)
        starts[:, i] = opens
        patch_start = torch.where(opens, i, patch_start)
    return starts


@pytest.mark.parametrize("mode", ["entropy", "relative", "token", "static"])
@pytest.mark.parametrize("row_reset", [True, False])
@pytest.mark.parametrize("cap", [None, 3])
def test_step_rule_equals_whole_sequence_rule(mode, row_reset, cap):
    if mode == "static" and cap is None:
        pytest.skip("static patches need a length")
    B, W = 6, 8
    T = W * W
    entropy = discrete_entropies(B, T, seed=7) if mode in ("entropy", "relative") else None
    threshold = None
    if mode == "entropy":
        q = quantize_entropy(entropy)
        threshold = float(q.flatten().median())  # a value that occurs: ties decide > against >=
        ties = q == threshold
    elif mode == "relative":
        q = quantize_entropy(entropy)
        rise = q[:, 1:] - q[:, :-1]
        threshold = float(rise[rise > 0].median())
        ties = torch.nn.functional.pad(rise == threshold, (1, 0))
    config = PatchingConfig(mode, threshold, cap, row_reset)
    whole = config.starts(entropy, W, shape=(B, T))
    rule = StepRule(config, W, T)
    assert torch.equal(step_by_step(rule, entropy, B, T), whole)
    lengths = config.lengths(entropy, W, shape=(B, T))
    assert int(lengths.max()) <= rule.max_patch_length
    if threshold is not None:
        # precondition: ties with tau at tokens that open no patch, where `>=` would open one
        assert (ties & ~whole).sum() >= 3
        assert whole[:, 1:].any() and not whole[:, 1:].all()


@pytest.mark.parametrize("mode", ["entropy", "relative"])
def test_step_rule_rounds_float32_entropies_like_the_whole_sequence_rule(mode):
    """float32 entropies within a fraction of a float16 step of the levels: both rules compare
    their float16 rounding, so values tied with tau in float16 but above it in float32 decide alike."""
    B, W = 6, 8
    T = W * W
    levels = discrete_entropies(B, T, seed=11)  # (B, T) float16-representable
    ulp = torch.exp2(torch.floor(torch.log2(levels)) - 10)  # float16 spacing at each level
    noise = (torch.rand(B, T, generator=torch.Generator().manual_seed(12)) - 0.5) * 0.4 * ulp
    entropy = levels + noise  # (B, T) float32
    assert torch.equal(quantize_entropy(entropy), levels) and (entropy != levels).float().mean() > 0.9
    if mode == "entropy":
        threshold = float(levels.flatten().median())
        above = (levels == threshold) & (entropy > threshold)
    else:
        rise = levels[:, 1:] - levels[:, :-1]
        threshold = float(rise[rise > 0].median())
        above = torch.nn.functional.pad((rise == threshold) & (entropy[:, 1:] - entropy[:, :-1] > threshold), (1, 0))
    config = PatchingConfig(mode, threshold, None, False)
    whole = config.starts(entropy, W)
    assert torch.equal(step_by_step(StepRule(config, W, T), entropy, B, T), whole)
    # precondition: a float32 comparison would open patches where the rounded one does not
    assert (above & ~whole).sum() >= 3


def test_step_rule_bad_step():
    rule = StepRule(PatchingConfig("token", None, None, True), 4, 16)
    with pytest.raises(ValueError, match="step must be"):
        rule.opens(16, None, None, torch.zeros(2, dtype=torch.long))


def test_read_lengths_form_a_small_set_that_covers_every_step():
    assert [read_length(n, 37, 8) for n in (1, 16, 17, 24, 25, 33, 37)] == [16, 16, 24, 24, 32, 37, 37]
    # the full-size GPT / entropy-model cache (class slot + 576 tokens) in blocks of 32
    lengths = [read_length(n, 577, 32) for n in range(1, 578)]
    assert sorted(set(lengths)) == [64, 96, 128, 192, 256, 384, 512, 577]
    assert all(n <= L <= max(64, 1.5 * n) for n, L in enumerate(lengths, start=1))
    assert all(a <= b for a, b in zip(lengths, lengths[1:]))


# --------------------------------------------------------------------------------------
# Host syncs per step
# --------------------------------------------------------------------------------------
class SyncRecorder(TorchDispatchMode):
    """Counts the ops that make the host wait for a CUDA device (nonzero, item, masked_select,
    boolean-mask indexing, copies to the CPU), per decoding step (`step` is advanced by the
    sampler below)."""

    SYNCING = {"aten.nonzero.default", "aten._local_scalar_dense.default", "aten.masked_select.default"}

    def __init__(self):
        super().__init__()
        self.step = 0
        self.per_step = Counter()
        self.ops = 0

    def syncs(self, func, args, kwargs) -> bool:
        name = str(func)
        if name in self.SYNCING:
            return True
        if name.startswith(("aten.index.Tensor", "aten.index_put")):
            indices = args[1] if len(args) > 1 else []
            return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices)
        if name.startswith("aten._to_copy"):
            return kwargs.get("device") == torch.device("cpu")
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if self.syncs(func, args, kwargs):
            self.per_step[self.step] += 1
        return func(*args, **kwargs)


class SteppedSampling(Sampling):
    """Sampling that tells the recorder where each decoding step ends."""

    recorder: SyncRecorder = None

    def pick(self, logits, step, uniforms):
        tokens = super().pick(logits, step, uniforms)
        self.recorder.step = step + 1
        return tokens


def test_sync_recorder_sees_syncing_ops():
    x = torch.randn(8)
    with SyncRecorder() as rec:
        x.nonzero()
        x.sum().item()
        x[x > 0]
        x.to("cpu", copy=True)
        x.float().sum() + 1  # no sync
    assert rec.per_step[0] == 4 and rec.ops > 4


def test_host_syncs_per_step():
    """GPT steps read nothing back; a DPAR step reads back at most one small tensor."""
    ent, model = random_entropy_model(), random_dpar()
    gpt = GPT_models["GPT-T"](vocab_size=VOCAB, block_size=T, num_classes=CLASSES).eval()
    cond = torch.tensor([0, 1, 2])
    uniforms = draw_uniforms(3, T, torch.Generator().manual_seed(0))
    for name, run in (("gpt", lambda s: generate_gpt(gpt, cond, T, s, uniforms)),
                      ("dpar", lambda s: generate_dpar(model, cond, T, s, uniforms, ent, quantile_patching(ent)))):
        sampling = SteppedSampling(cfg_scale=2.0, top_k=8, top_p=0.9)
        with SyncRecorder() as rec:
            sampling.recorder = rec
            out = run(sampling)
        assert rec.step == T and rec.ops > 100 * T  # the recorder saw every step
        steps = [rec.per_step[i] for i in range(1, T)]  # step i: after x_{i-1} was drawn
        if name == "gpt":
            assert sum(rec.per_step.values()) == 0, rec.per_step
        else:
            assert max(steps) == 1, rec.per_step
            assert (out.num_patches > GRID).all()  # gates really opened patches


def test_every_decode_attention_runs_with_the_pinned_kernels(monkeypatch):
    """The generation loops pin SDPA to DECODE_ATTENTION around every cached attention (prefill
    and steps), from outside the step functions, so compiled steps hold no context manager."""
    from autoregressive.models import modules

    seen = []
    attend = modules.cached_attend

    def recording(q, k, v, input_pos, reads=None):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled() or not torch.backends.cuda.mem_efficient_sdp_enabled())
        return attend(q, k, v, input_pos, reads)

    ent, model = random_entropy_model(), random_dpar()
    gpt = GPT_models["GPT-T"](vocab_size=VOCAB, block_size=T, num_classes=CLASSES).eval()
    cond = torch.tensor([0, 1])
    uniforms = draw_uniforms(2, T, torch.Generator().manual_seed(0))
    patching = quantile_patching(ent)
    monkeypatch.setattr(modules, "cached_attend", recording)
    generate_gpt(gpt, cond, T, Sampling(cfg_scale=2.0), uniforms)
    generate_dpar(model, cond, T, Sampling(cfg_scale=2.0), uniforms, ent, patching)
    assert len(seen) > 2 * T  # every layer of every step was seen
    assert not any(seen)  # cuDNN attention was off and the efficient kernel on, every time
    assert torch.backends.cuda.cudnn_sdp_enabled()  # and the pin ends with the generation
    assert "sdpa_kernel" not in inspect.getsource(modules.Attention)


# --------------------------------------------------------------------------------------
# Compiled steps: fullgraph, no recompiles after warm-up, same tokens as eager
# --------------------------------------------------------------------------------------
def test_compiled_decoding_equals_eager_without_recompiles():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ent, model = random_entropy_model(), random_dpar()
    gpt = GPT_models["GPT-T"](vocab_size=VOCAB, block_size=T, num_classes=CLASSES).eval()
    torch.nn.init.normal_(gpt.output.weight, std=0.5)
    patching = quantile_patching(ent)
    compiled = Decoding(compile=True, backend="eager", read_block=8)
    eager = Decoding(read_block=8)
    common = dict(cfg_scale=2.0, top_k=8, top_p=0.95)
    dpar_kwargs = dict(entropy_model=ent, patching=patching)
    # warm-up: one whole generation per model compiles every step function
    generate(gpt, torch.tensor([0, 1, 2, 3]), T, row_seeds=[1, 2, 3, 4], decoding=compiled, **common)
    generate(model, torch.tensor([0, 1, 2, 3]), T, row_seeds=[1, 2, 3, 4], decoding=compiled, **common, **dpar_kwargs)
    assert counters["stats"]["unique_graphs"] >= 5  # GPT, entropy, encoder, patch and decoder steps
    cond, seeds = torch.tensor([4, 2, 0, 3]), [11, 12, 13, 14]
    with torch._dynamo.config.patch(error_on_recompile=True):
        fast_gpt = generate(gpt, cond, T, row_seeds=seeds, decoding=compiled, **common)
        fast_dpar = generate(model, cond, T, row_seeds=seeds, decoding=compiled, **common, **dpar_kwargs)
    slow_gpt = generate(gpt, cond, T, row_seeds=seeds, decoding=eager, **common)
    slow_dpar = generate(model, cond, T, row_seeds=seeds, decoding=eager, **common, **dpar_kwargs)
    assert torch.equal(fast_gpt.tokens, slow_gpt.tokens)
    assert torch.equal(fast_dpar.tokens, slow_dpar.tokens)
    assert torch.equal(fast_dpar.num_patches, slow_dpar.num_patches)
    counts = fast_dpar.num_patches
    assert counts.min() < counts.max()  # rows opened patches at different steps: groups really varied
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# Incremental DPAR in every patching mode, and batch composition
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,cap,row_reset", [("relative", 3, True), ("entropy", None, True),
                                                ("entropy", None, False), ("static", 2, True), ("token", None, True)])
def test_incremental_matches_reference_in_every_mode(mode, cap, row_reset):
    ent, model = random_entropy_model(), random_dpar()
    if mode == "relative":
        codes = torch.randint(0, VOCAB, (16, T), generator=torch.Generator().manual_seed(5))
        q = quantize_entropy(teacher_forced_entropy(ent, codes))
        threshold = float((q[:, 1:] - q[:, :-1]).quantile(0.7))
        patching = PatchingConfig("relative", threshold, cap, row_reset)
    elif mode == "entropy":
        patching = PatchingConfig("entropy", quantile_patching(ent, 0.8).threshold, cap, row_reset)
    else:
        patching = PatchingConfig(mode, None, cap, row_reset)
    cond = torch.tensor([0, 1, 2])
    sampling = Sampling(cfg_scale=2.0, top_k=1)
    uniforms = draw_uniforms(3, T, torch.Generator().manual_seed(0))
    # blocks of 2 slots: read lengths 4, 6, 8, 12, ... so that steps cross many read-length boundaries
    fast = generate_dpar(model, cond, T, sampling, uniforms, ent, patching, decoding=Decoding(read_block=2))
    slow = reference_generate_dpar(model, cond, T, sampling, uniforms, ent, patching)
    assert torch.equal(fast.tokens, slow.tokens)
    assert torch.equal(fast.num_patches, slow.num_patches)
    assert torch.equal(fast.patch_starts, slow.patch_starts)
    if mode in ("entropy", "relative"):
        starts = patching.starts(teacher_forced_entropy(ent, fast.tokens), GRID)
        assert not (starts == starts[0]).all()  # rows opened patches at different steps
        # the decisions made while sampling are those the whole-sequence rule gives on the finished tokens
        assert torch.equal(fast.patch_starts, starts)
        assert int(patching.lengths(teacher_forced_entropy(ent, fast.tokens), GRID).max()) > 3 or cap is not None


def test_dpar_batch_composition_invariance_with_real_sampling():
    """Each image's tokens are the same alone or in any batch (per-image seeds, top-k > 1,
    top-p < 1, guidance), although batches change the patch steps' group sizes."""
    ent, model = random_entropy_model(), random_dpar()
    kwargs = dict(cfg_scale=2.0, top_k=8, top_p=0.9, temperature=1.0, entropy_model=ent,
                  patching=quantile_patching(ent))
    classes, seeds = [0, 3, 1, 4, 2], [101, 102, 103, 104, 105]
    batch = generate(model, torch.tensor(classes), T, row_seeds=seeds, **kwargs)
    order = [3, 0, 4]
    part = generate(model, torch.tensor([classes[i] for i in order]), T, row_seeds=[seeds[i] for i in order],
                    **kwargs)
    for j, i in enumerate(order):
        assert torch.equal(part.tokens[j], batch.tokens[i])
    for i in (1, 2):
        alone = generate(model, torch.tensor([classes[i]]), T, row_seeds=[seeds[i]], **kwargs)
        assert torch.equal(alone.tokens[0], batch.tokens[i])
    # preconditions: images open patches at different steps, and sampling is really random
    assert batch.num_patches.unique().numel() > 1
    greedy = generate(model, torch.tensor(classes), T, row_seeds=seeds, **{**kwargs, "top_k": 1})
    assert not torch.equal(greedy.tokens, batch.tokens)


def test_sample_cli_compile_flag_and_the_fast_path():
    from autoregressive.sample.cli import parse_args

    base = ["--gpt-ckpt", "g.pt", "--vq-ckpt", "v.pt"]
    assert parse_args(base).compile is None and parse_args(base + ["--compile"]).compile
    assert parse_args(base + ["--no-compile"]).compile is False
    cuda = fast_decoding(torch.device("cuda"))
    assert cuda.compile and cuda.mode == "reduce-overhead" and cuda.keep_caches
    cpu = fast_decoding(torch.device("cpu"))
    assert cpu.compile and cpu.mode is None and cpu.backend == "inductor"
    assert not Decoding().compile  # eager, the default


def test_kept_caches_are_reused_with_stale_slots_masked():
    """keep_caches: the next batch reuses the same buffers (fixed addresses for CUDA graphs), and
    what the previous batch left in them never reaches the new tokens."""
    ent, model = random_entropy_model(), random_dpar()
    gpt = GPT_models["GPT-T"](vocab_size=VOCAB, block_size=T, num_classes=CLASSES).eval()
    torch.nn.init.normal_(gpt.output.weight, std=0.5)
    kwargs = dict(cfg_scale=2.0, top_k=8, entropy_model=ent, patching=quantile_patching(ent))
    keep = Decoding(read_block=8, keep_caches=True)

    def addresses():
        return [model.patch_layers[0].attention.kv_cache.k_cache.data_ptr(), model.decode_buffers.states.data_ptr(),
                ent.layers[0].attention.kv_cache.k_cache.data_ptr(), gpt.layers[0].attention.kv_cache.v_cache.data_ptr()]

    generate(model, torch.tensor([0, 1, 2]), T, row_seeds=[1, 2, 3], decoding=keep, **kwargs)
    generate(gpt, torch.tensor([0, 1, 2]), T, row_seeds=[1, 2, 3], decoding=keep, cfg_scale=2.0, top_k=8)
    before = addresses()
    cond, seeds = torch.tensor([4, 3, 1]), [7, 8, 9]
    dpar_kept = generate(model, cond, T, row_seeds=seeds, decoding=keep, **kwargs)
    gpt_kept = generate(gpt, cond, T, row_seeds=seeds, decoding=keep, cfg_scale=2.0, top_k=8)
    assert addresses() == before
    dpar_fresh = generate(model, cond, T, row_seeds=seeds, decoding=Decoding(read_block=8), **kwargs)
    gpt_fresh = generate(gpt, cond, T, row_seeds=seeds, decoding=Decoding(read_block=8), cfg_scale=2.0, top_k=8)
    assert torch.equal(dpar_kept.tokens, dpar_fresh.tokens) and torch.equal(gpt_kept.tokens, gpt_fresh.tokens)
    assert model.decode_buffers is None and gpt.layers[0].attention.kv_cache is None  # eager runs free them


def test_step_functions_see_a_bounded_set_of_shapes():
    """Each step function is called with few distinct (shapes, int arguments) over a whole
    generation: one captured graph each, whatever the step (no step index as an int)."""
    from collections import defaultdict

    class Recording(Decoding):
        def wrap(self, fn):
            def run(*args):
                key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args
                            if isinstance(a, (torch.Tensor, int)))
                signatures[fn.__name__].add(key)
                calls[fn.__name__] += 1
                return fn(*args)

            return run

    signatures, calls = defaultdict(set), Counter()
    ent, model = random_entropy_model(), random_dpar()
    B, block = 5, 8
    generate(model, torch.arange(B), T, row_seeds=list(range(B)), cfg_scale=2.0, top_k=8,
             entropy_model=ent, patching=quantile_patching(ent), decoding=Recording(read_block=block))
    lengths = len({read_length(n, T + 1, block) for n in range(1, T + 2)})
    assert calls["encode_step"] == calls["_entropy"] == T - 1 and calls["decode_step"] == T
    for name in ("encode_step", "decode_step", "_entropy"):
        assert len(signatures[name]) <= lengths, signatures[name]
    # the patch step runs a group of images from a small set of sizes, and one read length per step
    groups = {patch_group(n, B) for n in range(1, B + 1)}
    assert groups == {1, 2, 4, 5}
    assert calls["close_patches"] > 2 * len(signatures["close_patches"])
    assert len(signatures["close_patches"]) <= lengths * len(groups), signatures["close_patches"]
    assert {key[-1] for key in signatures["close_patches"]} <= groups
    assert len({key[:-2] for key in signatures["close_patches"]}) == 1, signatures["close_patches"]


def test_a_read_of_the_whole_cache_compiles_no_second_graph():
    """The caches hold a spare slot that no read reaches, so the longest read is a strided view
    like every other (a contiguous whole-buffer read made AOT tracing compile a second graph)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gpt = GPT_models["GPT-T"](vocab_size=VOCAB, block_size=T, num_classes=CLASSES).eval()
    R = 4
    gpt.setup_caches(R, 1 + T)
    step = torch.compile(gpt.decode, backend="aot_eager", fullgraph=True, dynamic=True)
    tokens = torch.randint(0, VOCAB, (R,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for length in (16, gpt.cache_length):
            out = step(tokens, torch.full((R, 1), length - 1), length)
            assert torch.allclose(out, gpt.decode(tokens, torch.full((R, 1), length - 1), length), atol=1e-5)
    assert gpt.cache_length == 1 + T  # precondition: the last read covers every slot a row holds
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
