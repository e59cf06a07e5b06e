"""The sampling semantics shared by GPT and DPAR (LlamaGen's), each against a plain reference:
temperature divides the logits, top-k keeps exactly k tokens, top-p keeps the token that
crosses p, guidance mixes uncond + s (cond - uncond) of the [cond; null] halves only when
s > 1 and only for the decoding steps cfg_interval allows. The fast-vs-reference generation
tests share these functions on both sides, so they are checked here directly."""
import math

import pytest
import torch

from autoregressive.models.generate import Sampling, guided_logits, sample_tokens, top_k_top_p_filtering

B, V = 256, 24


def random_logits(seed: int, rows: int = B, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, V, generator=g, dtype=torch.float64) * 2.0).to(dtype)


def random_uniforms(seed: int, rows: int = B) -> torch.Tensor:
    return torch.rand(rows, generator=torch.Generator().manual_seed(seed))


def inverse_cdf(probs: list, u: float) -> tuple:
    """Plain inverse-CDF draw from probabilities (python floats): the first index whose
    cumulative probability exceeds u * total, and the distance of u * total to the nearest
    cumulative boundary (how close the draw is to flipping)."""
    total = sum(probs)
    target, cum, margin = u * total, 0.0, math.inf
    chosen = None
    for i, p in enumerate(probs):
        cum += p
        margin = min(margin, abs(cum - target))
        if chosen is None and cum > target:
            chosen = i
    return (len(probs) - 1 if chosen is None else chosen), margin


def reference_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> tuple:
    """float64 softmax(logits / T) sampled row by row -> tokens (B,), margins (B,)."""
    probs = (logits.double() / temperature).softmax(-1).tolist()
    drawn = [inverse_cdf(p, float(u)) for p, u in zip(probs, uniforms.tolist())]
    return torch.tensor([t for t, _ in drawn]), torch.tensor([m for _, m in drawn])


# ---------------------------------------------------------------------------------------
# Temperature
# ---------------------------------------------------------------------------------------
def test_near_zero_temperature_gives_the_argmax():
    logits, u = random_logits(0), random_uniforms(1)
    plain = sample_tokens(logits, u)
    assert (plain != logits.argmax(-1)).float().mean() > 0.3  # precondition: T = 1 often draws another token
    for t in (1e-6, 1e-3):
        assert torch.equal(sample_tokens(logits, u, temperature=t), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    """Same uniforms: the tokens equal a float64 inverse-CDF draw from softmax(logits / T),
    and differ from the T = 1 draw on many rows (temperature changes the distribution)."""
    logits, u = random_logits(2), random_uniforms(3)
    tokens = sample_tokens(logits, u, temperature=temperature)
    expected, margin = reference_tokens(logits, u, temperature)
    clear = margin > 1e-5  # rows whose float32 draw cannot flip against the float64 one
    assert clear.float().mean() > 0.95
    assert torch.equal(tokens[clear], expected[clear])
    untempered, _ = reference_tokens(logits, u, 1.0)
    assert (expected != untempered).float().mean() > 0.2


# ---------------------------------------------------------------------------------------
# Top-k / top-p
# ---------------------------------------------------------------------------------------
def reference_filter(row: list, top_k: int, top_p: float) -> set:
    """Indices kept by LlamaGen's filter, by plain loops: the k largest logits, then, in order
    of decreasing probability (renormalised over those), tokens until the running sum exceeds
    top_p, the crossing token included."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    kept = order[:top_k] if top_k > 0 else order
    if top_p >= 1.0:
        return set(kept)
    weights = [math.exp(row[i] - row[kept[0]]) for i in kept]
    total, running, out = sum(weights), 0.0, []
    for i, w in zip(kept, weights):
        out.append(i)
        running += w / total
        if running > top_p:
            break
    return set(out)


def kept_sets(filtered: torch.Tensor) -> list:
    return [set(torch.isfinite(r).nonzero().flatten().tolist()) for r in filtered]


@pytest.mark.parametrize("top_k", [1, 5, V - 1])
def test_top_k_keeps_exactly_k_tokens(top_k):
    logits = random_logits(4, rows=64)
    filtered = top_k_top_p_filtering(logits, top_k=top_k)
    assert (torch.isfinite(filtered).sum(-1) == top_k).all()
    assert kept_sets(filtered) == [reference_filter(r, top_k, 1.0) for r in logits.tolist()]
    keep = torch.isfinite(filtered)
    assert torch.equal(filtered[keep], logits[keep])  # kept logits unchanged
    assert torch.equal(top_k_top_p_filtering(logits, top_k=0), logits)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (0, 0.9), (8, 0.7)])
def test_top_p_keeps_the_crossing_token(top_k, top_p):
    logits = random_logits(5, rows=64, dtype=torch.float64)
    filtered = top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
    expected = [reference_filter(r, top_k, top_p) for r in logits.tolist()]
    assert kept_sets(filtered) == expected
    # preconditions: no running sum sits at top_p, and the crossing token matters: the kept
    # mass without it is below top_p on every row
    probs = logits.softmax(-1) if top_k == 0 else top_k_top_p_filtering(logits, top_k=top_k).softmax(-1)
    for row, keep in zip(probs.tolist(), expected):
        mass = sorted((row[i] for i in keep), reverse=True)
        assert sum(mass[:-1]) < top_p - 1e-9 < top_p + 1e-9 < sum(mass)
    assert min(len(k) for k in expected) >= 1 and max(len(k) for k in expected) > 2


def test_sampling_filters_the_tempered_distribution():
    """top-k / top-p act on logits / T: sampled tokens equal a float64 draw from the filtered,
    tempered distribution."""
    logits, u = random_logits(6), random_uniforms(7)
    for temperature, top_k, top_p in [(0.5, 5, 1.0), (2.0, 0, 0.8), (1.5, 10, 0.6)]:
        tokens = sample_tokens(logits, u, temperature, top_k, top_p)
        scaled = logits.double() / temperature
        masked = torch.full_like(scaled, float("-inf"))
        for r, keep in enumerate(reference_filter(row, top_k, top_p) for row in scaled.tolist()):
            masked[r, list(keep)] = scaled[r, list(keep)]
        expected, margin = reference_tokens(masked, u, 1.0)
        clear = margin > 1e-5
        assert clear.float().mean() > 0.95
        assert torch.equal(tokens[clear], expected[clear]), (temperature, top_k, top_p)


# ---------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------
def test_guided_logits_mix_uncond_plus_scale_times_difference():
    cond, uncond = random_logits(8, rows=16, dtype=torch.float64), random_logits(9, rows=16, dtype=torch.float64)
    both = torch.cat([cond, uncond])  # [cond; null], as the generators lay out the batch
    for scale in (1.5, 4.0):
        mixed = guided_logits(both, scale, True)
        expected = torch.stack([uncond[b] + scale * (cond[b] - uncond[b]) for b in range(16)])
        assert torch.allclose(mixed, expected, rtol=0, atol=1e-12)
        wrong = [cond + scale * (cond - uncond), cond + scale * (uncond - cond)]  # other base, halves swapped
        assert all((mixed - w).abs().max() > 0.1 for w in wrong)
    assert torch.equal(guided_logits(both, 4.0, False), cond)


def reference_guided(step: int, cfg_scale: float, cfg_interval: int) -> bool:
    """LlamaGen: token 0 (prefill) is guided; decoding step i (token i + 1) is guided while
    i <= cfg_interval, or always when cfg_interval is -1; nothing is guided unless scale > 1."""
    if cfg_scale <= 1.0:
        return False
    return step == 0 or cfg_interval == -1 or step - 1 <= cfg_interval


@pytest.mark.parametrize("cfg_scale,cfg_interval", [(4.0, -1), (4.0, 0), (4.0, 3), (1.0, -1), (0.5, 2)])
def test_pick_guides_only_the_steps_the_settings_allow(cfg_scale, cfg_interval):
    """At T near 0 pick returns the argmax of what it samples from: the mix on guided steps,
    the conditional half on the others; without guidance (s <= 1) the batch is not doubled."""
    sampling = Sampling(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=1e-6)
    assert sampling.doubled == (cfg_scale > 1.0)
    rows = 64
    u = random_uniforms(10, rows)
    for step in range(8):
        cond, uncond = random_logits(20 + step, rows), random_logits(40 + step, rows)
        logits = torch.cat([cond, uncond]) if sampling.doubled else cond
        tokens = sampling.pick(logits, step, u)
        guided = reference_guided(step, cfg_scale, cfg_interval)
        assert sampling.guided(step) == guided, step
        target = uncond + cfg_scale * (cond - uncond) if guided else cond
        assert torch.equal(tokens, target.argmax(-1)), step
        if sampling.doubled:  # precondition: the two answers differ on many rows
            assert ((uncond + cfg_scale * (cond - uncond)).argmax(-1) != cond.argmax(-1)).float().mean() > 0.3
