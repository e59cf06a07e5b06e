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
        from autoregressive.models.dpar_generate import generate_dpar

        return generate_dpar(model, cond, max_new_tokens, sampling, uniforms, **dpar_kwargs)
    if dpar_kwargs:
        raise ValueError(f"unexpected arguments for a GPT model: {sorted(dpar_kwargs)}")
    return generate_gpt(model, cond, max_new_tokens, sampling, uniforms)
