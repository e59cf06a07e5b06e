import torch

from autoregressive.models.generate import generate
from autoregressive.models.gpt import GPT_models, GPTConfig, Transformer
from llamagen_fixtures import load_fixture, rule_state_dict


def fixture_model():
    fx = load_fixture("gpt_c2i_tiny.pt")
    cfg = fx["config"]
    model = Transformer(GPTConfig(**cfg))
    model.load_state_dict(rule_state_dict(fx["keys"]), strict=True)
    return model.eval(), fx


def random_gpt(model_type="c2i", seed=0, **kwargs):
    """A GPT-T with every weight random (LlamaGen zero-initialises the head)."""
    torch.manual_seed(seed)
    kwargs = {"vocab_size": 32, "block_size": 16, "num_classes": 5, **kwargs}
    model = GPT_models["GPT-T"](model_type=model_type, **kwargs)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.eval()


def test_state_dict_keys_are_llamagens():
    model, fx = fixture_model()
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert sorted(ours) == sorted((k, tuple(s)) for k, s in fx["keys"])


def test_fixture_logits_and_loss():
    model, fx = fixture_model()
    with torch.no_grad():
        logits, _ = model(fx["idx"][:, :-1], fx["cond"])
        _, loss = model(fx["idx"][:, :-1], fx["cond"], targets=fx["idx"])  # the trainer's loss
    assert logits.shape == fx["logits"].shape
    assert (logits - fx["logits"]).abs().max() < 1e-4
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), fx["idx"].flatten())
    assert abs(loss.item() - fx["loss"].item()) < 1e-5 and abs(plain.item() - fx["loss"].item()) < 1e-5


def test_fixture_greedy_generations():
    model, fx = fixture_model()
    T = fx["config"]["block_size"]
    cfg = generate(model, fx["generate_cond"], T, cfg_scale=fx["generate_cfg_scale"], top_k=1)
    plain = generate(model, fx["generate_cond"], T, cfg_scale=1.0, top_k=1)
    assert torch.equal(cfg.tokens, fx["generated_cfg4_greedy"])
    assert torch.equal(plain.tokens, fx["generated_nocfg_greedy"])
    assert not torch.equal(cfg.tokens, plain.tokens)  # guidance really changed the result


def test_cached_decoding_matches_recomputation():
    """Each cached step's logits equal a full teacher-forced pass over the same prefix."""
    model = random_gpt()
    cond = torch.tensor([0, 3, 4])
    out = generate(model, cond, 16, temperature=1.0, generator=torch.Generator().manual_seed(0))
    tokens = out.tokens
    assert tokens.unique().numel() > 4  # a real sample, not a constant sequence
    model.setup_caches(3, 17)
    try:
        with torch.no_grad():
            cached = [model.prefill(cond)] + [model.decode_step(tokens[:, s - 1], s) for s in range(1, 16)]
            full, _ = model(tokens[:, :-1], cond)
    finally:
        model.remove_caches()
    assert torch.allclose(torch.stack(cached, 1), full, atol=1e-5)


def test_sampling_is_per_row_deterministic():
    model = random_gpt()
    a = generate(model, torch.tensor([1, 2]), 16, row_seeds=[7, 8], cfg_scale=2.0).tokens
    b = generate(model, torch.tensor([2, 1, 1]), 16, row_seeds=[8, 7, 9], cfg_scale=2.0).tokens
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])


def test_unconditional_ignores_classes():
    model = random_gpt("uncond")
    assert model.cls_embedding.embedding_table.weight.shape[0] == 1
    idx = torch.randint(0, 32, (2, 15))
    la, _ = model(idx, None)
    lb, _ = model(idx, torch.tensor([3, 4]))
    assert torch.equal(la, lb)
