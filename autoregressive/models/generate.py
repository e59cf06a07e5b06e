"""KV-cached sampling shared by the LlamaGen GPT and DPAR.

Semantics follow LlamaGen: logits / max(temperature, 1e-5), then top-k (if > 0), then top-p
(if < 1), softmax, one draw. Classifier-free guidance doubles the batch as [cond; null] and
mixes uncond + scale * (cond - uncond) when scale > 1; with cfg_interval > -1 the decoding
steps i > cfg_interval (i counts from 0 at token 1) use the conditional logits alone.

Draws use one uniform number per (image, token), fixed before sampling starts: with
`row_seeds` each image's uniforms come from its own seed, so an image does not depend on
which other images share its batch.
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from autoregressive.models.dpar import gather_patch_tokens
from entropy_model.entropy import IncrementalEntropy, entropy_from_logits
from entropy_model.patching import PatchingConfig, quantize_entropy


def top_k_top_p_filtering(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) -> logits with the filtered entries set to -inf."""
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """logits (B, V), uniforms (B,) in [0, 1) -> tokens (B,) by inverse-CDF sampling."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = top_k_top_p_filtering(logits, top_k, top_p)
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    u = uniforms[:, None].to(cdf) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(1)
    return tokens.clamp_(max=logits.shape[-1] - 1)


def guided_logits(logits: torch.Tensor, cfg_scale: float, use_guidance: bool) -> torch.Tensor:
    """logits (2B, V) for [cond; null] -> (B, V)."""
    cond, uncond = logits.chunk(2, dim=0)
    if not use_guidance:
        return cond
    return uncond + cfg_scale * (cond - uncond)


def draw_uniforms(
    batch: int, length: int, generator: Optional[torch.Generator] = None, row_seeds: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """(batch, length) uniforms on the CPU, from one generator or one seed per row."""
    if row_seeds is None:
        return torch.rand(batch, length, generator=generator)
    if len(row_seeds) != batch:
        raise ValueError(f"{len(row_seeds)} row seeds for a batch of {batch}")
    return torch.stack([torch.rand(length, generator=torch.Generator().manual_seed(int(s))) for s in row_seeds])


@dataclass
class Sampling:
    """Guidance and sampling settings shared by every generator."""

    cfg_scale: float = 1.0
    cfg_interval: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def doubled(self) -> bool:
        return self.cfg_scale > 1.0

    def guided(self, step: int) -> bool:
        """Whether token `step` mixes in the unconditional logits."""
        return self.doubled and not (self.cfg_interval > -1 and step - 1 > self.cfg_interval)

    def pick(self, logits: torch.Tensor, step: int, uniforms: torch.Tensor) -> torch.Tensor:
        """logits (B or 2B, V) at token `step` -> tokens (B,)."""
        if self.doubled:
            logits = guided_logits(logits, self.cfg_scale, self.guided(step))
        return sample_tokens(logits, uniforms, self.temperature, self.top_k, self.top_p)


def conditioning(cond: torch.Tensor, null_class: int, sampling: Sampling) -> torch.Tensor:
    """(B,) classes -> (B,) or (2B,) [cond; null] when guidance doubles the batch."""
    if not sampling.doubled:
        return cond
    return torch.cat([cond, torch.full_like(cond, null_class)])


@dataclass
class Generated:
    tokens: torch.Tensor  # (B, T) codes
    num_patches: Optional[torch.Tensor] = None  # (B,) patch-transformer steps per image (DPAR)
    logits: Optional[torch.Tensor] = None  # (R, T, V) raw model logits per step, when kept


@torch.no_grad()
def generate_gpt(
    model, cond: torch.Tensor, max_new_tokens: int, sampling: Sampling, uniforms: torch.Tensor
) -> Generated:
    """LlamaGen GPT: prefill the class slot, then one cached decoding step per token."""
    B = cond.shape[0]
    cond_all = conditioning(cond, model.null_class, sampling)
    model.setup_caches(cond_all.shape[0], model.config.cls_token_num + max_new_tokens)
    try:
        tokens = torch.empty(B, max_new_tokens, dtype=torch.long, device=cond.device)
        logits = model.prefill(cond_all)
        for step in range(max_new_tokens):
            if step > 0:
                previous = tokens[:, step - 1]
                logits = model.decode_step(previous.repeat(cond_all.shape[0] // B), step)
            tokens[:, step] = sampling.pick(logits, step, uniforms[:, step])
    finally:
        model.remove_caches()
    return Generated(tokens)


def generate(
    model,
    cond: torch.Tensor,
    max_new_tokens: int,
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    row_seeds: Optional[Sequence[int]] = None,
    **dpar_kwargs,
) -> Generated:
    """Sample (B, max_new_tokens) codes for classes cond (B,) from a GPT or a DPAR model.
    DPAR also needs `entropy_model` and `patching` (see dpar_generate)."""
    sampling = Sampling(cfg_scale, cfg_interval, temperature, top_k, top_p)
    uniforms = draw_uniforms(cond.shape[0], max_new_tokens, generator, row_seeds).to(cond.device)
    if getattr(model, "is_dpar", False):
        return generate_dpar(model, cond, max_new_tokens, sampling, uniforms, **dpar_kwargs)
    if dpar_kwargs:
        raise ValueError(f"unexpected arguments for a GPT model: {sorted(dpar_kwargs)}")
    return generate_gpt(model, cond, max_new_tokens, sampling, uniforms)


# --------------------------------------------------------------------------------------
# DPAR
# --------------------------------------------------------------------------------------
def opens_patch(
    patching: PatchingConfig,
    step: int,
    entropy: Optional[torch.Tensor],
    prev_entropy: Optional[torch.Tensor],
    open_length: torch.Tensor,
    row_width: int,
) -> torch.Tensor:
    """The patching rule at one step i > 0 (entropy_model.patching.patch_starts, one column at
    a time): entropy = e_i, prev_entropy = e_{i-1} (B,), open_length (B,) tokens in the open
    patch. Returns (B,) bool: does token i open a patch?"""
    if not patching.needs_entropy:  # gate-free modes: patch_starts' fixed pattern at column `step`
        column = patching.starts(None, row_width, shape=(1, step + 1), device=open_length.device)[0, step]
        return column.expand_as(open_length).clone()
    opens = torch.zeros_like(open_length, dtype=torch.bool)
    if patching.mode == "entropy":
        opens |= quantize_entropy(entropy) > patching.threshold
    elif patching.mode == "relative":
        opens |= quantize_entropy(entropy) - quantize_entropy(prev_entropy) > patching.threshold
    if patching.row_reset and step % row_width == 0:
        opens.fill_(True)
    if patching.max_patch_length is not None:
        opens |= open_length >= patching.max_patch_length
    return opens


def _finish_patches(model, states: torch.Tensor, rows: torch.Tensor, start: torch.Tensor, step: int):
    """Pool the patches [start, step-1] of `rows` from the stored encoder states
    states (B, E, T, dim). Returns p (n, dim) and the patches' geometry (row, col_start, col_end)."""
    W = model.config.grid_size
    lengths = (step - start)[:, None]  # (n, 1)
    per_layer = [gather_patch_tokens(states[rows, l, :step], start[:, None], lengths) for l in range(states.shape[1])]
    valid = per_layer[0][1][:, 0]  # (n, L)
    p = model.pool_patches([tokens[:, 0] for tokens, _ in per_layer], valid)  # (n, dim)
    last = torch.full_like(start, step - 1)
    return p, (start // W, start % W, last % W)


@torch.no_grad()
def generate_dpar(
    model,
    cond: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    uniforms: torch.Tensor,
    entropy_model=None,
    patching: Optional[PatchingConfig] = None,
    keep_logits: bool = False,
) -> Generated:
    """Fully incremental DPAR sampling (DESIGN.md section 4). At step i the entropy model and
    the encoder read x_{i-1}; rows whose token i opens a patch pool their finished patch and
    advance the patch transformer by one slot (only those rows, each at its own slot); one
    decoder step then gives the logits of x_i."""
    if patching is None:
        raise ValueError("DPAR generation needs the patching settings (PatchingConfig)")
    if patching.needs_entropy and entropy_model is None:
        raise ValueError(f"patching mode {patching.mode!r} needs the entropy model")
    cfg = model.config
    B, T, W, dev = cond.shape[0], max_new_tokens, cfg.grid_size, cond.device
    cond_all = conditioning(cond, model.null_class, sampling)
    R = cond_all.shape[0]
    copies = R // B  # 2 with guidance: both halves share tokens, entropies and patches
    model.setup_caches(R)
    scorer = IncrementalEntropy(entropy_model, B) if patching.needs_entropy else None
    try:
        tokens = torch.empty(B, T, dtype=torch.long, device=dev)
        dtype = model.tok_embeddings.weight.dtype
        states = torch.zeros(B, cfg.n_encoder_layer, T, cfg.dim, dtype=dtype, device=dev)  # h^l of x_j
        patch_start = torch.zeros(B, dtype=torch.long, device=dev)
        num_patches = torch.ones(B, dtype=torch.long, device=dev)
        zeros = torch.zeros(R, dtype=torch.long, device=dev)
        g = model.patch_step(
            model.cls_embedding(cond_all)[:, 0], torch.arange(R, device=dev), zeros, (zeros,) * 3, length=1
        )
        injections = model.injections(g)  # (R, D, dim)
        prev_entropy = scorer.start() if scorer else None
        logits = model.decode_step(model.decoder_start.to(dtype).expand(R, -1), injections, 0)
        kept = [logits] if keep_logits else None
        tokens[:, 0] = sampling.pick(logits, 0, uniforms[:, 0])
        for i in range(1, T):
            previous = tokens[:, i - 1]
            entropy = scorer.step(previous, i) if scorer else None
            states[:, :, i - 1] = model.encode_step(previous, i - 1)
            opens = opens_patch(patching, i, entropy, prev_entropy, i - patch_start, W)
            prev_entropy = entropy
            rows = opens.nonzero().squeeze(1)  # (n,)
            if rows.numel():
                p, geometry = _finish_patches(model, states, rows, patch_start[rows], i)
                cache_rows = torch.cat([rows + k * B for k in range(copies)])
                slot = num_patches[rows].repeat(copies)
                geometry = tuple(t.repeat(copies) for t in geometry)
                g = model.patch_step(p.repeat(copies, 1), cache_rows, slot, geometry, length=i + 1)
                injections[cache_rows] = model.injections(g)
                patch_start[rows] = i
                num_patches[rows] += 1
            logits = model.decode_step(states[:, -1, i - 1].repeat(copies, 1), injections, i)
            if keep_logits:
                kept.append(logits)
            tokens[:, i] = sampling.pick(logits, i, uniforms[:, i])
    finally:
        model.remove_caches()
        if scorer:
            scorer.close()
    return Generated(tokens, num_patches, torch.stack(kept, dim=1) if keep_logits else None)


@torch.no_grad()
def reference_generate_dpar(
    model,
    cond: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    uniforms: torch.Tensor,
    entropy_model=None,
    patching: Optional[PatchingConfig] = None,
) -> Generated:
    """Slow, obviously correct DPAR sampling for tests and benchmarks only: every step re-runs
    the entropy model and the teacher-forced DPAR forward on the whole prefix."""
    B, W = cond.shape[0], model.config.grid_size
    cond_all = conditioning(cond, model.null_class, sampling)
    copies = cond_all.shape[0] // B
    tokens = torch.empty(B, 0, dtype=torch.long, device=cond.device)
    for i in range(max_new_tokens):
        entropy = entropy_from_logits(entropy_model(tokens, None)[0]) if patching.needs_entropy else None
        lengths = patching.lengths(entropy, W, shape=(B, i + 1), device=cond.device)  # (B, M)
        logits, _ = model(tokens.repeat(copies, 1), cond_all, lengths.repeat(copies, 1))
        nxt = sampling.pick(logits[:, -1], i, uniforms[:, i])
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    return Generated(tokens, (lengths > 0).sum(-1))
