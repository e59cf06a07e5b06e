"""The training loss of every family (GPT, the entropy model, DPAR); adding a term:
docs/design.md, "Adding a loss term"."""
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn


@dataclass(frozen=True)
class LossConfig:
    """One field per train_c2i.py flag of the same name; the defaults give the plain cross-entropy."""

    z_loss: float = 0.0  # --z-loss: weight of logsumexp(logits)^2 per token (PaLM's z-loss)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "LossConfig":
        return cls(**{f.name: flags[f.name] for f in fields(cls)})


def chunk_loss(logits: torch.Tensor, targets: torch.Tensor, config: LossConfig):
    """logits (n, V) float32, targets (n, 1) -> (the loss summed over the n rows, its gradient
    with respect to the logits (n, V)). Each term adds its value and its gradient."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
    probs = torch.exp(logits - lse)  # (n, V)
    value = (lse - logits.gather(1, targets)).sum()  # cross-entropy
    grad = probs.scatter_add(1, targets, torch.full_like(lse, -1.0))  # softmax - onehot
    if config.z_loss:
        value = value + config.z_loss * lse.square().sum()
        grad = grad + 2 * config.z_loss * lse * probs
    return value, grad


class _ChunkedLoss(torch.autograd.Function):
    """Mean chunk_loss of logits h @ weight^T, chunk by chunk of rows, the gradients computed in
    the same pass, also under no_grad (backward only scales them): no (N, V) tensor outlives its chunk."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, config: LossConfig, chunk_rows: int):
        N, device = h.shape[0], h.device.type
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h, grad_weight = torch.empty_like(h), torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else \
            torch.promote_types(h.dtype, weight.dtype)
        for start in range(0, N, chunk_rows):
            rows = slice(start, min(start + chunk_rows, N))
            hc = h[rows]  # (n, dim)
            value, d_logits = chunk_loss((hc @ weight.t()).float(), targets[rows, None], config)  # autocast's matmul
            total = total + value
            d_logits = (d_logits / N).to(mm_dtype)  # (n, V)
            grad_h[rows] = (d_logits @ weight.to(mm_dtype)).to(h.dtype)  # (n, dim)
            grad_weight += (d_logits.t() @ hc.to(mm_dtype)).float()  # (V, dim)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_weight)
        return total / N

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_h, grad_weight = ctx.saved_tensors
        return grad_h * grad.to(grad_h.dtype), (grad_weight * grad).to(ctx.weight_dtype), None, None, None


def chunked_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, config: LossConfig = LossConfig(),
                 chunk_rows: int = 4096) -> torch.Tensor:
    """The mean chunk_loss (default config: F.cross_entropy) of the logits h @ weight^T, never
    all held at once: h (N, dim) final-norm states, weight (V, dim) the output head, targets (N,)
    in [0, V). Each chunk's logits are float32 from the matmul dtype (autocast's, if on)."""
    if h.ndim != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"chunked_loss needs h (N, dim) and targets (N,), got {tuple(h.shape)} and "
                         f"{tuple(targets.shape)}")
    return _ChunkedLoss.apply(h, weight, targets, config, chunk_rows)


def teacher_forced_output(h: torch.Tensor, head: nn.Linear, targets: Optional[torch.Tensor], config: LossConfig):
    """What a teacher-forced forward returns, from its final-norm hidden states h (B, T, dim):
    without targets, (logits (B, T, V) float32, None) (LlamaGen's pair); with targets (B, T),
    (None, the mean loss under `config`), computed without the logits."""
    if targets is None:
        return head(h).float(), None
    return None, chunked_loss(h.reshape(-1, h.shape[-1]), head.weight, targets.reshape(-1), config)
