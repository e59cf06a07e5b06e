"""KV-cached sampling shared by the LlamaGen GPT and DPAR.

Semantics follow LlamaGen: logits / max(temperature, 1e-5), then top-k (if > 0), then top-p
(if < 1), softmax, one draw. Classifier-free guidance doubles the batch as [cond; null] and
mixes uncond + scale * (cond - uncond) when scale > 1; with cfg_interval > -1 the decoding
steps i > cfg_interval (i counts from 0 at token 1) use the conditional logits alone.

Draws use one uniform number per (image, token), fixed before sampling starts: with
`row_seeds` each image's uniforms come from its own seed, so an image does not depend on
which other images share its batch.

Decode steps have static shapes (see `Decoding`): caches are read over a bounded set of lengths,
each row its own prefix (cached_attend); DPAR's patch step runs a power-of-two group holding the
images that open a patch (patch_group); a GPT step reads nothing back to the host and a DPAR step
reads one small tensor (the count of images that open a patch and the highest slot among them).
The fast path runs each step function compiled (torch.compile, fullgraph; CUDA graphs on CUDA);
eager is the default and the reference.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from autoregressive.models import model_family
from autoregressive.models.modules import decode_attention, read_length
from entropy_model.entropy import IncrementalEntropy, entropy_from_logits
from entropy_model.patching import PatchingConfig, StepRule, starts_from_lengths


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
class Decoding:
    """How the decode steps run.

    compile: run each step function (GPT step; entropy-model, encoder, patch and decoder steps)
        through torch.compile(fullgraph=True, dynamic=True); else eager.
    backend, mode: torch.compile's ("inductor" with mode "reduce-overhead" captures CUDA graphs;
        a backend may also be a callable, as torch.compile takes it).
    read_block: caches are read in blocks of this many slots, so a whole generation sees at most
        about 2 log2(T / read_block) key lengths per step function (read_length).
    keep_caches: leave the KV caches attached after a generation: the next batch of the same size
        reuses their buffers (captured CUDA graphs keep their addresses). Free them with the
        model's remove_caches().
    """

    compile: bool = False
    backend: str | Callable = "inductor"
    mode: Optional[str] = None
    read_block: int = 32
    keep_caches: bool = False

    def __post_init__(self):
        if self.read_block < 1:
            raise ValueError(f"read_block must be >= 1, got {self.read_block}")

    def wrap(self, fn: Callable) -> Callable:
        """fn compiled as this says, or fn itself when eager. With CUDA graphs every call starts a
        new graph generation, so each (function, shape) is captured once on its own, never as a
        path of graphs; a call's outputs are valid until the next call of any wrapped function
        (callers consume or copy them before that)."""
        if not self.compile:
            return fn
        compiled = torch.compile(fn, backend=self.backend, mode=self.mode, fullgraph=True, dynamic=True)
        if self.mode != "reduce-overhead":
            return compiled

        def run(*args):
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args)

        return run


def patch_group(opening: int, images: int) -> int:
    """Images a patch step runs when `opening` (>= 1) of `images` open a patch: the next power of
    two, at most `images`, so a step function sees at most log2(images) + 2 group sizes."""
    return min(images, 1 << (opening - 1).bit_length())


def fast_decoding(device: torch.device | str) -> Decoding:
    """The fast path for `device`: compiled steps, with CUDA graphs on CUDA; caches kept between
    batches so that the graphs are captured once."""
    cuda = torch.device(device).type == "cuda"
    return Decoding(compile=True, mode="reduce-overhead" if cuda else None, keep_caches=True)


def _check_length(model, max_new_tokens: int) -> None:
    if not 1 <= max_new_tokens <= model.config.block_size:
        raise ValueError(f"max_new_tokens must be in 1..{model.config.block_size}, got {max_new_tokens}")


@dataclass
class Generated:
    tokens: torch.Tensor  # (B, T) codes
    num_patches: Optional[torch.Tensor] = None  # (B,) patch-transformer steps per image (DPAR)
    logits: Optional[torch.Tensor] = None  # (R, T, V) raw model logits per step, when kept
    patch_starts: Optional[torch.Tensor] = None  # (B, T) bool: token i opened a patch (DPAR)


@torch.no_grad()
@decode_attention()
def generate_gpt(
    model, cond: torch.Tensor, max_new_tokens: int, sampling: Sampling, uniforms: torch.Tensor,
    decoding: Optional[Decoding] = None,
) -> Generated:
    """LlamaGen GPT: prefill the class slot, then one cached decoding step per token. A step
    reads nothing back to the host."""
    _check_length(model, max_new_tokens)
    decoding = decoding or Decoding()
    B = cond.shape[0]
    cond_all = conditioning(cond, model.null_class, sampling)
    R = cond_all.shape[0]
    model.setup_caches(R, model.config.cls_token_num + model.config.block_size)
    step_fn = decoding.wrap(model.decode)
    try:
        tokens = torch.empty(B, max_new_tokens, dtype=torch.long, device=cond.device)
        logits = model.prefill(cond_all)
        for step in range(max_new_tokens):
            if step > 0:
                previous = tokens[:, step - 1].repeat(R // B)
                logits = step_fn(previous, *model.step_position(R, step, decoding.read_block))
            tokens[:, step] = sampling.pick(logits, step, uniforms[:, step])
    finally:
        if not decoding.keep_caches:
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
    decoding: Optional[Decoding] = None,
    **dpar_kwargs,
) -> Generated:
    """Sample (B, max_new_tokens) codes for classes cond (B,) from a GPT or a DPAR model.
    DPAR also needs `entropy_model` and `patching` (see generate_dpar). decoding: eager by
    default; fast_decoding(device) for the compiled fast path."""
    sampling = Sampling(cfg_scale, cfg_interval, temperature, top_k, top_p)
    uniforms = draw_uniforms(cond.shape[0], max_new_tokens, generator, row_seeds).to(cond.device)
    if model_family(model).patched:
        return generate_dpar(model, cond, max_new_tokens, sampling, uniforms, decoding=decoding, **dpar_kwargs)
    if dpar_kwargs:
        raise ValueError(f"unexpected arguments for a GPT model: {sorted(dpar_kwargs)}")
    return generate_gpt(model, cond, max_new_tokens, sampling, uniforms, decoding)


# --------------------------------------------------------------------------------------
# DPAR
# --------------------------------------------------------------------------------------
@torch.no_grad()
@decode_attention()
def generate_dpar(
    model,
    cond: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    uniforms: torch.Tensor,
    entropy_model=None,
    patching: Optional[PatchingConfig] = None,
    keep_logits: bool = False,
    decoding: Optional[Decoding] = None,
) -> Generated:
    """Fully incremental DPAR sampling (docs/design.md, "Generation"). At step i the entropy model and
    the encoder read x_{i-1}; rows whose token i opens a patch pool their finished patch and
    advance the patch transformer by one slot (those rows keep the result, each at its own slot); one
    decoder step then gives the logits of x_i.

    A patch step runs the n opening images padded to patch_group(n, B) images (DPAR.close_patches),
    each cache row reading its own patch cache; its shapes are one per (group size, read length).
    The step reads (n, highest slot among the opening images) back to the host: n = 0 skips the
    patch step, n sets the group size and the slot bounds the patch caches' read length. Nothing
    else leaves the device."""
    if patching is None:
        raise ValueError("DPAR generation needs the patching settings (PatchingConfig)")
    if patching.needs_entropy and entropy_model is None:
        raise ValueError(f"patching mode {patching.mode!r} needs the entropy model")
    _check_length(model, max_new_tokens)
    decoding = decoding or Decoding()
    cfg = model.config
    B, T, dev = cond.shape[0], max_new_tokens, cond.device
    cond_all = conditioning(cond, model.null_class, sampling)
    R = cond_all.shape[0]
    copies = R // B  # 2 with guidance: both halves share tokens, entropies and patches
    rule = StepRule(patching, cfg.grid_size, T, dev)
    max_length = rule.max_patch_length
    block, capacity = decoding.read_block, cfg.block_size
    model.setup_caches(R, images=B)
    scorer = None
    if patching.needs_entropy:
        scorer = IncrementalEntropy(entropy_model, B, read_block=block, wrap=decoding.wrap,
                                    keep_cache=decoding.keep_caches)
    encode, close_patches, decode = (decoding.wrap(f) for f in (model.encode_step, model.close_patches,
                                                                 model.decode_step))
    try:
        tokens = torch.empty(B, T, dtype=torch.long, device=dev)
        patch_start = torch.zeros(B, dtype=torch.long, device=dev)
        num_patches = torch.ones(B, dtype=torch.long, device=dev)
        patch_starts = torch.zeros(B, T, dtype=torch.bool, device=dev)
        patch_starts[:, 0] = True
        model.start_patches(cond_all, read_length(1, capacity, block))
        prev_entropy = scorer.start() if scorer else None
        start_vector = model.decoder_start.to(model.tok_embeddings.weight.dtype).expand(R, -1).contiguous()
        logits = decode(start_vector, torch.zeros(R, 1, dtype=torch.long, device=dev), read_length(1, capacity, block))
        kept = [logits.clone()] if keep_logits else None
        tokens[:, 0] = sampling.pick(logits, 0, uniforms[:, 0])
        for i in range(1, T):
            previous = tokens[:, i - 1]
            entropy = scorer.step(previous, i) if scorer else None
            opens = rule.opens(i, entropy, prev_entropy, i - patch_start)  # (B,)
            prev_entropy = entropy.clone() if entropy is not None else None  # outputs live until the next call
            patch_starts[:, i] = opens
            h = encode(previous, torch.full((B, 1), i - 1, device=dev), read_length(i, capacity, block))  # (B, dim)
            u = h.repeat(copies, 1)  # (R, dim) decoder input u_i = h_{i-1}
            # the host read: how many rows open, and the highest slot among them (the read bound)
            n, top = torch.stack([opens.sum(), (num_patches * opens).max()]).to("cpu", copy=True).tolist()
            if n:
                close_patches(opens, patch_start, num_patches, torch.full((1,), i, device=dev), max_length,
                              read_length(top + 1, capacity, block), patch_group(n, B))
                patch_start = torch.where(opens, i, patch_start)
                num_patches = num_patches + opens
            logits = decode(u, torch.full((R, 1), i, device=dev), read_length(i + 1, capacity, block))
            if keep_logits:
                kept.append(logits.clone())
            tokens[:, i] = sampling.pick(logits, i, uniforms[:, i])
    finally:
        if not decoding.keep_caches:
            model.remove_caches()
        if scorer:
            scorer.close()
    return Generated(tokens, num_patches, torch.stack(kept, dim=1) if keep_logits else None, patch_starts)


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
    return Generated(tokens, (lengths > 0).sum(-1), patch_starts=starts_from_lengths(lengths))
