"""Tests that pin DPAR to the method: incremental = reference generation with real sampling in
every patching mode, the patch-transformer RoPE tables against plain implementations of
docs/design.md, "The DPAR model: causal alignment", causality on the packed layout, the fractional static pattern, and the
authors' defaults (dropout, initialisation) with the flags that restore the old behaviour."""
import math
from fractions import Fraction

import pytest
import torch

from autoregressive.models.dpar import DPAR, DPAR_models, DPARConfig
from autoregressive.models.generate import (
    Sampling,
    draw_uniforms,
    generate_dpar,
    guided_logits,
    reference_generate_dpar,
)
from autoregressive.models.gpt import GPTConfig
from autoregressive.models.modules import rope_dynamic
from autoregressive.sample.loading import PatchingOverrides, sampling_patching
from autoregressive.train.args import parse_args
from autoregressive.train.data import training_patching
from autoregressive.train.model import model_kwargs
from dpar_helpers import CLASSES, GRID, T, VOCAB, quantile_patching, random_dpar, random_entropy_model
from entropy_model.entropy import entropy_from_logits, teacher_forced_entropy
from entropy_model.patching import (
    PAPER_COMPRESSION,
    PAPER_MAX_PATCH_LENGTHS,
    PAPER_STATIC_LENGTH,
    PAPER_THRESHOLDS,
    PatchingConfig,
    paper_threshold,
    quantize_entropy,
    static_pattern_starts,
)


# --------------------------------------------------------------------------------------
# Incremental vs reference generation, real sampling, every patching mode
# --------------------------------------------------------------------------------------
def patching_for(mode: str, ent) -> PatchingConfig:
    if mode == "entropy":
        return quantile_patching(ent)
    if mode == "relative":
        return PatchingConfig("relative", 0.05, 3, True)
    if mode == "relative-no-reset":
        return PatchingConfig("relative", 0.05, None, False)
    if mode == "token":
        return PatchingConfig("token", None, None, True)
    if mode == "static":
        return PatchingConfig("static", None, 4, True)
    if mode == "static-fractional":
        return PatchingConfig("static", None, 4, True, static_length=1.8191)
    return PatchingConfig("static", None, None, False, static_length=2.6)  # static-fractional-no-reset


def tie_patching(ent, model, cond, sampling, uniforms) -> PatchingConfig:
    """tau equal to the float16 entropy e_1 of image 0: x_0 comes before any patch decision, so
    generation meets a tie at step 1 whatever tau is (the gate is strict: e > tau)."""
    first = reference_generate_dpar(model, cond, 1, sampling, uniforms, ent, quantile_patching(ent)).tokens  # (B, 1)
    with torch.no_grad():
        entropy = entropy_from_logits(ent(first, None)[0])  # (B, 2): e_0, e_1
    return PatchingConfig("entropy", float(quantize_entropy(entropy[0, 1])), 3, True)


MODES = ["entropy", "relative", "relative-no-reset", "token", "static", "static-fractional",
         "static-fractional-no-reset"]


@pytest.mark.parametrize("mode,cfg_scale", [(mode, 2.5) for mode in MODES] + [("entropy", 1.0), ("tie", 2.5)])
def test_incremental_matches_reference_with_real_sampling(mode, cfg_scale):
    ent, model = random_entropy_model(), random_dpar()
    cond = torch.tensor([0, 1, 2, 3])
    sampling = Sampling(cfg_scale=cfg_scale, temperature=1.5, top_k=12, top_p=0.95)
    uniforms = draw_uniforms(4, T, torch.Generator().manual_seed(7))
    patching = tie_patching(ent, model, cond, sampling, uniforms) if mode == "tie" else patching_for(mode, ent)
    fast = generate_dpar(model, cond, T, sampling, uniforms, ent, patching, keep_logits=True)
    slow = reference_generate_dpar(model, cond, T, sampling, uniforms, ent, patching)
    assert torch.equal(fast.tokens, slow.tokens)
    assert torch.equal(fast.num_patches, slow.num_patches)
    # preconditions: real sampling (rows are not greedy) and patches as the mode intends
    entropy = teacher_forced_entropy(ent, fast.tokens) if patching.needs_entropy else None
    starts = patching.starts(entropy, GRID, shape=(4, T))
    assert torch.equal(fast.num_patches, starts.sum(-1))
    mixed = guided_logits(fast.logits, cfg_scale, True) if cfg_scale > 1 else fast.logits  # (B, T, V)
    assert (fast.tokens != mixed.argmax(-1)).float().mean() > 0.15  # really sampled, not greedy
    if mode == "tie":  # the tie really happens: e_1 of image 0 equals tau in float16
        assert float(quantize_entropy(entropy[0, 1])) == patching.threshold and not starts[0, 1]
    if patching.needs_entropy:  # rows open patches at different steps, by the gate
        assert not (starts == starts[0]).all()
        no_gate = PatchingConfig(patching.mode, float("inf"), patching.max_patch_length, patching.row_reset)
        assert (starts & ~no_gate.starts(entropy, GRID)).any()
    elif patching.static_length is not None:  # both lengths of the fractional pattern occur
        lengths = patching.lengths(None, GRID, shape=(1, T))[0]
        assert {math.floor(patching.static_length), math.ceil(patching.static_length)} <= set(lengths.tolist())


# --------------------------------------------------------------------------------------
# Patch-transformer RoPE against plain implementations of docs/design.md, "The DPAR model: causal alignment"
# --------------------------------------------------------------------------------------
def plain_rotation(angles):
    return [[math.cos(a), math.sin(a)] for a in angles]


def plain_dynamic(row, col_start, col_end, head_dim, base=10000.0):
    """d/4 pairs by row with theta_j = base^(-2j/(d/2)); four groups of d/16 pairs by col_start,
    col_end, col_end, col_start with theta_j = base^(-2j/(d/8))."""
    angles = [row * base ** (-2 * j / (head_dim / 2)) for j in range(head_dim // 4)]
    for col in (col_start, col_end, col_end, col_start):
        angles += [col * base ** (-2 * j / (head_dim / 8)) for j in range(head_dim // 16)]
    return plain_rotation(angles)


def plain_2d(row, col, head_dim, base=10000.0):
    angles = [row * base ** (-2 * j / (head_dim / 2)) for j in range(head_dim // 4)]
    angles += [col * base ** (-2 * j / (head_dim / 2)) for j in range(head_dim // 4)]
    return plain_rotation(angles)


def plain_1d(position, head_dim, base=10000.0):
    return plain_rotation([position * base ** (-2 * j / head_dim) for j in range(head_dim // 2)])


def plain_slot_tables(lengths_row, width, head_dim, rope):
    """Per slot s of one image's sequence [C, p_0, ..., p_{M-2}]: the all-zero class table at s = 0,
    else the table of patch P_{s-1} (row and columns of its first and last token)."""
    tables, first = [[[0.0, 0.0]] * (head_dim // 2)], 0
    for s, length in enumerate(lengths_row[:-1], start=1):
        last = first + length - 1
        row, col_start, col_end = first // width, first % width, last % width
        if rope == "dynamic":
            tables.append(plain_dynamic(row, col_start, col_end, head_dim))
        elif rope == "2d":
            tables.append(plain_2d(row, col_start, head_dim))
        else:
            tables.append(plain_1d(s - 1, head_dim))
        first += length
    return torch.tensor(tables, dtype=torch.float64)  # (M, head_dim/2, 2)


def tiny_config(head_dim: int, rope: str) -> DPARConfig:
    return DPARConfig(dim=4 * head_dim, n_head=4, n_encoder_layer=1, n_patch_layer=1, n_decoder_layer=1,
                      vocab_size=VOCAB, block_size=T, num_classes=CLASSES, patch_rope=rope)


def test_rope_dynamic_matches_plain_formula():
    g = torch.Generator().manual_seed(0)
    for head_dim in (32, 64):
        row = torch.randint(0, 24, (50,), generator=g)
        col_start = torch.randint(0, 24, (50,), generator=g)
        col_end = (col_start + torch.randint(1, 4, (50,), generator=g)) % 24  # spans several columns
        assert (col_start != col_end).all()
        table = rope_dynamic(row, col_start, col_end, head_dim)
        plain = torch.tensor([plain_dynamic(*map(int, rc), head_dim) for rc in zip(row, col_start, col_end)],
                             dtype=torch.float64)
        assert table.shape == (50, head_dim // 2, 2)
        assert torch.allclose(table.double(), plain, atol=2e-5)


@pytest.mark.parametrize("rope", ["dynamic", "2d", "1d"])
def test_patch_rope_tables_follow_the_held_patch(rope):
    """The model's slot tables (layout geometry + table + class convention), padded and packed,
    at two head dims. The layouts include a patch spanning several columns and, without row
    reset, patches whose last token lies on a later row (col_end < col_start)."""
    lengths = torch.tensor([
        [1, 4, 1, 2, 4, 3, 4, 2, 3, 4, 4, 4],  # no reset: 1+4 crosses row 0 -> 1 at width 6
        [6, 6, 6, 6, 6, 6, 0, 0, 0, 0, 0, 0],
        [3, 3, 2, 4, 4, 4, 4, 4, 4, 4, 0, 0],
    ])
    assert (lengths.sum(-1) == T).all()
    for head_dim in (32, 64):
        model = DPAR(tiny_config(head_dim, rope))
        for packed in (False, True):
            layout = model.patch_layout(lengths, packed=packed)
            table = model.patch_rope(*layout.slot_geometry.unbind(-1)).double()  # (R, S, hd/2, 2)
            table = table.flatten(0, 1)  # flat slot index
            for b in range(lengths.shape[0]):
                real = lengths[b][lengths[b] > 0].tolist()
                plain = plain_slot_tables(real, GRID, head_dim, rope)
                slots = layout.class_slot[b] + torch.arange(len(real))
                assert torch.allclose(table[slots], plain, atol=2e-5), (rope, head_dim, packed, b)
                assert (table[layout.class_slot[b]] == 0).all()  # LlamaGen's class convention
    # the layout really holds a row-crossing patch and a multi-column one
    first = lengths[0].cumsum(0) - lengths[0]
    last = first + lengths[0] - 1
    assert ((last // GRID > first // GRID) & (lengths[0] > 1)).any()


# --------------------------------------------------------------------------------------
# Causality on the packed layout
# --------------------------------------------------------------------------------------
@torch.no_grad()
def test_packed_layout_is_causal_with_recomputed_patches():
    ent, model = random_entropy_model(), random_dpar()
    patching = quantile_patching(ent)
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, VOCAB, (4, T), generator=g)
    cond = torch.randint(0, CLASSES, (4,), generator=g)

    def run(x):
        starts = patching.starts(teacher_forced_entropy(ent, x), GRID)
        layout = model.patch_layout(patching.lengths(teacher_forced_entropy(ent, x), GRID), packed=True)
        assert layout.packed
        return starts, model(x[:, :-1], cond, layout)[0]

    starts, logits = run(codes)
    assert not (starts == starts[0]).all()  # images open patches at different tokens
    moved = 0
    for k in (1, 5, GRID + 2, 2 * GRID - 1, 3 * GRID + 1, T - 3):
        changed = codes.clone()
        changed[:, k] = (changed[:, k] + 1 + torch.randint(0, VOCAB - 1, (4,), generator=g)) % VOCAB
        new_starts, new_logits = run(changed)
        moved += int(not torch.equal(new_starts[:, k + 1 :], starts[:, k + 1 :]))
        assert torch.allclose(new_logits[:, : k + 1], logits[:, : k + 1], atol=1e-5), k
        assert not torch.allclose(new_logits[:, k + 1 :], logits[:, k + 1 :], atol=1e-4), k
    assert moved >= 2  # the perturbations really moved later boundaries


# --------------------------------------------------------------------------------------
# The fractional static pattern
# --------------------------------------------------------------------------------------
def round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def plain_static_pattern(T_, mean_length, width):
    """Plain loop over rows (row reset) or over k (no reset), in exact decimal arithmetic."""
    L = Fraction(str(mean_length))
    starts = [False] * T_
    if width is None:
        k = 0
        while math.ceil(k * L) < T_:
            starts[math.ceil(k * L)] = True
            k += 1
        return starts
    for r in range(math.ceil(T_ / width)):
        count = round_half_up((r + 1) * width / L) - round_half_up(r * width / L)
        count = min(max(count, 1), width)
        for j in range(count):
            i = r * width + math.ceil(Fraction(j * width, count))
            if i < T_:
                starts[i] = True
    return starts


def lengths_of(starts):
    out = []
    for s in starts:
        if s:
            out.append(1)
        else:
            out[-1] += 1
    return out


@pytest.mark.parametrize("mean_length", [1.0, 1.8191, 2.06, 2.5, 3.7])
@pytest.mark.parametrize("grid", [16, 24])
def test_fractional_static_pattern_against_plain_loop(mean_length, grid):
    tokens = grid * grid
    for width in (grid, None):
        starts = static_pattern_starts(tokens, mean_length, width)
        plain = plain_static_pattern(tokens, mean_length, width)
        assert starts.tolist() == plain
        lengths = lengths_of(plain)
        # the mean is the nearest a whole patch count allows, lengths are L rounded down or up
        L = Fraction(str(mean_length))
        assert len(lengths) == (round_half_up(tokens / L) if width else math.floor((tokens - 1) / L) + 1)
        assert abs(tokens / len(lengths) - mean_length) <= 2 * mean_length**2 / tokens
        assert set(lengths[:-1]) <= {math.floor(mean_length), math.ceil(mean_length)}
        # a prefix gets the prefix's starts (generation applies the pattern token by token)
        assert static_pattern_starts(tokens // 2 + 3, mean_length, width).tolist() == plain[: tokens // 2 + 3]
        if width:  # row reset: every row starts a patch and its lengths differ by at most one
            for r in range(grid):
                row = lengths_of(plain[r * grid : (r + 1) * grid])
                assert plain[r * grid] and max(row) - min(row) <= 1
    paper = PatchingConfig("static", None, 4, True, static_length=PAPER_STATIC_LENGTH).lengths(None, 16, (2, 256))
    assert ((paper > 0).sum(-1) == 141).all()  # 256 / 141 = 1.8156, the nearest to 1.8191


def test_static_length_cap_and_config_errors():
    capped = PatchingConfig("static", None, 3, True, static_length=3.7).lengths(None, GRID, shape=(1, T))
    assert capped.max() == 3
    uncapped = PatchingConfig("static", None, None, True, static_length=3.7).lengths(None, GRID, shape=(1, T))
    assert uncapped.max() > 3
    assert PatchingConfig.from_dict(PatchingConfig("static", None, 4, True, 1.8191).to_dict()).static_length == 1.8191
    with pytest.raises(ValueError, match="static_length"):
        PatchingConfig("entropy", 7.8, 4, True, static_length=2.0)
    with pytest.raises(ValueError, match=">= 1"):
        PatchingConfig("static", None, 4, True, static_length=0.5)
    assert PAPER_THRESHOLDS == {256: 7.8, 384: 7.9, 512: 8.1} and paper_threshold(384) == 7.9
    assert PAPER_MAX_PATCH_LENGTHS == {256: 4, 384: 4, 512: 6} and PAPER_COMPRESSION == {256: 1.81, 384: 2.06}
    assert PatchingConfig().threshold == 7.8


# --------------------------------------------------------------------------------------
# Defaults: dropout and initialisation, and the flags that restore the old behaviour
# --------------------------------------------------------------------------------------
def dropout_rates(blocks):
    return {(b.attention.attn_dropout_p, b.attention.resid_dropout.p, b.feed_forward.ffn_dropout.p, b.drop_path.rate)
            for b in blocks}


def test_local_blocks_have_no_dropout_by_default_and_flag_restores_it():
    kw = dict(vocab_size=VOCAB, block_size=T, num_classes=CLASSES, drop_path_rate=0.2, attn_dropout_p=0.05)
    depths = dict(n_encoder_layer=2, n_patch_layer=1, n_decoder_layer=1)  # encoder layer 1 has a drop-path rate
    model = DPAR(DPARConfig(dim=64, n_head=4, **depths, **kw))
    assert dropout_rates(model.encoder_layers) == {(0.0, 0.0, 0.0, 0.0)}
    assert {r[:3] for r in dropout_rates(model.decoder_layers)} == {(0.0, 0.0, 0.0)}
    assert {r[:3] for r in dropout_rates(model.patch_layers)} == {(0.05, 0.1, 0.1)}  # LlamaGen's
    assert model.encoder_dropout.p == 0.0 and model.tok_dropout.p == 0.1
    old = DPAR(DPARConfig(dim=64, n_head=4, local_dropout=True, **depths, **kw))
    assert {r[:3] for r in dropout_rates([*old.encoder_layers, *old.decoder_layers])} == {(0.05, 0.1, 0.1)}
    assert old.encoder_layers[1].drop_path.rate > 0
    assert old.encoder_dropout.p == 0.1
    gpt = GPTConfig()  # the GPT (baseline and entropy model) keeps LlamaGen's dropouts
    assert (gpt.token_dropout_p, gpt.resid_dropout_p, gpt.ffn_dropout_p) == (0.1, 0.1, 0.1)

    # behaviour in training mode: encoder states are deterministic by default, random with the flag
    codes = torch.randint(0, VOCAB, (2, T))
    lengths = PatchingConfig("static", None, 3, True).lengths(None, GRID, shape=(2, T))
    for m, deterministic in ((model, True), (old, False)):
        m.train()
        seen = []
        hook = m.encoder_layers[0].register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
        with torch.no_grad():
            m(codes[:, :-1], torch.tensor([0, 1]), lengths)
            m(codes[:, :-1], torch.tensor([0, 1]), lengths)
        hook.remove()
        assert torch.equal(seen[0], seen[1]) == deterministic


def test_patch_init_default_and_blt():
    def stds(model):
        cross = torch.cat([l.weight.flatten() for m in model.patch_cross_attn for l in m.projections()])
        inject = torch.cat([l.weight.flatten() for m in model.patch_injections for l in m.projections()])
        return cross, inject

    cfg = dict(dim=256, n_head=4, n_encoder_layer=1, n_patch_layer=1, n_decoder_layer=2, vocab_size=VOCAB,
               block_size=T, num_classes=CLASSES)
    torch.manual_seed(0)
    default = DPAR(DPARConfig(**cfg))
    for w in stds(default):
        assert abs(w.std().item() - 0.02) < 0.001
    blt = DPAR(DPARConfig(patch_init="blt", **cfg))
    std = 256**-0.5
    for w in stds(blt):
        assert abs(w.std().item() / std - 0.9866) < 0.02  # a normal cut at +-3 std keeps 98.66% of its std
        assert w.abs().max().item() <= 3 * std and w.abs().max().item() > 2.5 * std
    assert abs(blt.patch_layers[0].attention.wqkv.weight.std().item() - 0.02) < 0.001  # the rest as before
    assert (blt.output.weight == 0).all()


def test_trainer_flags_reach_the_model_config():
    base = ["--code-path", "x", "--gpt-model", "DPAR-T"]
    args = parse_args(base)
    assert not args.local_dropout and args.patch_init == "llamagen" and args.static_length is None
    args = parse_args(base + ["--local-dropout", "--patch-init", "blt", "--patching-mode", "static",
                              "--static-length", "1.8191"])
    args.vocab_size, args.block_size, args.num_classes = VOCAB, T, CLASSES  # resolved from the store in training
    config = DPAR_models["DPAR-T"](**model_kwargs(args)).config
    assert config.local_dropout and config.patch_init == "blt" and args.static_length == 1.8191
    for bad in (["--static-length", "1.8"], ["--patching-mode", "static", "--static-length", "0.5"]):
        with pytest.raises(SystemExit):
            parse_args(base + bad)
    with pytest.raises(SystemExit):
        parse_args(["--code-path", "x", "--gpt-model", "GPT-T", "--local-dropout"])


def test_static_pattern_reaches_checkpoint_and_sampling():
    args = parse_args(["--code-path", "x", "--gpt-model", "DPAR-T", "--patching-mode", "static",
                       "--static-length", "1.8191"])
    config, achieved = training_patching(args, 96, None, GRID)
    assert achieved is None and config.to_dict()["static_length"] == 1.8191  # stored in checkpoints
    assert PatchingConfig.from_dict(config.to_dict()) == config  # what the trainer's batches rebuild from the run
    stored = {"patching": config.to_dict()}
    assert sampling_patching(stored, PatchingOverrides()) == config
    assert sampling_patching(stored, PatchingOverrides(static_length=2.4)).static_length == 2.4
    switched = sampling_patching(stored, PatchingOverrides(mode="entropy", threshold=7.8))
    assert switched.mode == "entropy" and switched.static_length is None
    args = parse_args(["--code-path", "x", "--gpt-model", "DPAR-T"])
    assert training_patching(args, 384, None, 24)[0].threshold == 7.9  # the paper's tau at 384 px
