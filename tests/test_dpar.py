import dataclasses

import pytest
import torch

from autoregressive.models import (
    DPAR_FAMILY, FAMILIES, GPT_FAMILY, all_models, build_config, build_model, model_family)
from autoregressive.models.dpar import DPAR, DPAR_models, DPARConfig
from autoregressive.models.generate import Sampling, draw_uniforms, generate, generate_dpar, reference_generate_dpar
from autoregressive.models.gpt import GPT_models
from dpar_helpers import CLASSES, GRID, T, VOCAB, quantile_patching, random_dpar, random_entropy_model
from entropy_model.entropy import teacher_forced_entropy
from entropy_model.patching import PatchingConfig, patch_starts


def patches_for(entropy_model, patching, codes):
    e = teacher_forced_entropy(entropy_model, codes)
    return patching.starts(e, GRID), patching.lengths(e, GRID)


def gate_only_starts(entropy_model, patching, codes):
    """Starts caused by the entropy gate alone (not token 0, row starts or the cap)."""
    starts, _ = patches_for(entropy_model, patching, codes)
    no_gate = patch_starts(None, None, patching.max_patch_length, GRID, mode="static", shape=codes.shape)
    return starts & ~no_gate


@torch.no_grad()
def test_causality_with_recomputed_patches():
    ent, model = random_entropy_model(), random_dpar()
    patching = quantile_patching(ent)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, VOCAB, (4, T), generator=g)
    cond = torch.randint(0, CLASSES, (4,), generator=g)
    starts, lengths = patches_for(ent, patching, codes)
    # preconditions: real gate boundaries, rows that open patches at different positions
    assert gate_only_starts(ent, patching, codes).sum() >= 4
    assert not (starts == starts[0]).all()
    logits, _ = model(codes[:, :-1], cond, lengths)
    ks = {1, 7, GRID, 2 * GRID, T - 2}  # includes row starts
    ks |= set(starts[0].nonzero().flatten()[2:5].tolist())  # patch starts
    ks |= {k - 1 for k in starts[0].nonzero().flatten()[3:6].tolist()}  # patch ends
    moved_boundary = False
    for k in sorted(ks):
        changed = codes.clone()
        changed[:, k] = (changed[:, k] + 1 + torch.randint(0, VOCAB - 1, (4,), generator=g)) % VOCAB
        new_starts, new_lengths = patches_for(ent, patching, changed)
        assert torch.equal(new_starts[:, : k + 1], starts[:, : k + 1])  # decisions up to k never move
        moved_boundary |= not torch.equal(new_starts, starts)
        new_logits, _ = model(changed[:, :-1], cond, new_lengths)
        assert torch.allclose(new_logits[:, : k + 1], logits[:, : k + 1], atol=1e-5), k
        if k < T - 1:
            assert not torch.allclose(new_logits[:, k + 1 :], logits[:, k + 1 :], atol=1e-4)
    assert moved_boundary  # some perturbation moved a later boundary


def test_token_mode_sees_every_slot():
    model = random_dpar()
    codes = torch.randint(0, VOCAB, (2, T))
    lengths = PatchingConfig("token", None, None, True).lengths(None, GRID, shape=(2, T))
    seen = []
    model.patch_layers[0].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        logits, _ = model(codes[:, :-1], torch.tensor([0, 1]), lengths)
    assert seen == [torch.Size([2, T, model.config.dim])] and logits.shape == (2, T, VOCAB)


@torch.no_grad()
def test_batch_padding_invariance():
    ent, model = random_entropy_model(), random_dpar()
    patching = quantile_patching(ent)
    codes = torch.randint(0, VOCAB, (5, T), generator=torch.Generator().manual_seed(11))
    cond = torch.arange(5) % CLASSES
    _, lengths = patches_for(ent, patching, codes)
    counts = (lengths > 0).sum(-1)
    assert counts.min() < counts.max()  # samples really have different patch counts
    batch, _ = model(codes[:, :-1], cond, lengths)
    for b in range(5):
        alone_lengths = lengths[b : b + 1, : int(counts[b])]
        alone, _ = model(codes[b : b + 1, :-1], cond[b : b + 1], alone_lengths)
        assert torch.allclose(alone[0], batch[b], atol=1e-5)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_incremental_matches_reference_and_teacher_forcing(cfg_scale):
    ent, model = random_entropy_model(), random_dpar()
    patching = quantile_patching(ent)
    cond = torch.tensor([0, 1, 2, 3])
    sampling = Sampling(cfg_scale=cfg_scale, top_k=1)
    uniforms = draw_uniforms(4, T, torch.Generator().manual_seed(0))
    fast = generate_dpar(model, cond, T, sampling, uniforms, ent, patching, keep_logits=True)
    slow = reference_generate_dpar(model, cond, T, sampling, uniforms, ent, patching)
    assert torch.equal(fast.tokens, slow.tokens)
    assert torch.equal(fast.num_patches, slow.num_patches)
    # precondition: the rows opened patches at different steps
    starts, lengths = patches_for(ent, patching, fast.tokens)
    assert not (starts == starts[0]).all() and gate_only_starts(ent, patching, fast.tokens).any()
    assert torch.equal(fast.num_patches, (lengths > 0).sum(-1))
    # every incremental step's logits equal the teacher-forced logits of the final sequence
    rows = 2 if cfg_scale > 1 else 1
    cond_all = torch.cat([cond, torch.full_like(cond, CLASSES)]) if rows == 2 else cond
    with torch.no_grad():
        tf, _ = model(fast.tokens[:, :-1].repeat(rows, 1), cond_all, lengths.repeat(rows, 1))
    assert torch.allclose(fast.logits, tf, atol=1e-4)


def test_generate_dispatches_and_samples():
    ent, model = random_entropy_model(), random_dpar()
    out = generate(model, torch.tensor([1, 4]), T, cfg_scale=2.0, top_k=8, generator=torch.Generator().manual_seed(1),
                   entropy_model=ent, patching=quantile_patching(ent))
    assert out.tokens.shape == (2, T) and out.tokens.max() < VOCAB
    assert (out.num_patches >= GRID).all() and (out.num_patches <= T).all()


def test_state_dict_round_trip(tmp_path):
    model = random_dpar(patch_rope="dynamic")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = DPAR(DPARConfig(**vars(model.config))).eval()
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
    codes = torch.randint(0, VOCAB, (2, T))
    lengths = PatchingConfig("static", None, 3, True).lengths(None, GRID, shape=(2, T))
    with torch.no_grad():
        assert torch.equal(model(codes[:, :-1], torch.tensor([0, 1]), lengths)[0],
                           fresh(codes[:, :-1], torch.tensor([0, 1]), lengths)[0])


@pytest.mark.parametrize("rope", ["2d", "1d"])
def test_positional_variants_run(rope):
    model = random_dpar(patch_rope=rope)
    codes = torch.randint(0, VOCAB, (2, T))
    lengths = PatchingConfig("static", None, 2, True).lengths(None, GRID, shape=(2, T))
    _, loss = model(codes[:, :-1], torch.tensor([0, 1]), lengths, targets=codes)
    loss.backward()
    assert torch.isfinite(loss) and model.patch_layers[0].attention.wqkv.weight.grad.abs().sum() > 0


def test_parameter_counts_close_to_gpt():
    for size in ("B", "L", "XL"):
        with torch.device("meta"):
            gpt = GPT_models[f"GPT-{size}"]()
            dpar = DPAR_models[f"DPAR-{size}"]()
        n_gpt = sum(p.numel() for p in gpt.parameters())
        n_dpar = sum(p.numel() for p in dpar.parameters())
        print(f"GPT-{size} {n_gpt / 1e6:.1f}M  DPAR-{size} {n_dpar / 1e6:.1f}M")
        assert abs(n_dpar / n_gpt - 1) < 0.10
        assert dpar.config.n_layer == gpt.config.n_layer


def test_every_registry_name_belongs_to_one_family():
    """model_family answers for names, built models and compiled models alike; each family's
    record builds its own model and config classes, also back from a stored config."""
    assert sum(len(f.configs) for f in FAMILIES) == len(all_models())  # no name in two registries
    assert all(model_family(name) is family for family in FAMILIES for name in family.configs)
    for family, name in ((GPT_FAMILY, "GPT-T"), (DPAR_FAMILY, "DPAR-T")):
        model = build_model(name, vocab_size=32, block_size=16, num_classes=5)
        again = build_model(name, **dataclasses.asdict(model.config))  # back from a stored config
        assert type(model) is family.model_class and type(model.config) is family.config_class
        assert model_family(model) is family and model_family(torch.compile(model)) is family
        assert again.config == model.config
    assert DPAR_FAMILY.patched and not GPT_FAMILY.patched


def test_registry_sizes_are_data_that_give_the_built_models_config():
    """build_config reads the registry's sizes without building a model; the config equals the one
    of the model that LlamaGen's call form (GPT_models[name](**kwargs)) builds, for every name."""
    registries = {**GPT_models, **DPAR_models}
    assert registries.keys() == all_models().keys()
    kwargs = dict(vocab_size=32, block_size=16, num_classes=5, token_dropout_p=0.0)
    for name, builder in registries.items():
        with torch.device("meta"):
            built = builder(**kwargs).config
        config = build_config(name, **kwargs)
        assert config == built and type(config) is model_family(name).config_class
        assert all(getattr(config, k) == v for k, v in all_models()[name].items())
    deeper = build_config("DPAR-L", n_encoder_layer=2, n_patch_layer=18)  # kwargs override the sizes
    assert (deeper.n_encoder_layer, deeper.n_patch_layer, deeper.n_decoder_layer, deeper.n_layer) == (2, 18, 4, 24)
    with pytest.raises(ValueError, match="unknown model"):
        model_family("DPAR-unknown")
    with pytest.raises(ValueError, match="not a model of any family"):
        model_family(torch.nn.Linear(2, 2))
