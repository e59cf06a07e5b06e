"""Next-token entropies of the (unconditional GPT) entropy model, teacher-forced or step by step."""
from typing import Optional

import torch


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...,) entropy in nats, computed in float32 whatever the input dtype."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def teacher_forced_entropy(entropy_model, codes: torch.Tensor) -> torch.Tensor:
    """codes (B, T) -> e (B, T) float32: e_t is the entropy of p(x_t | x_<t)."""
    logits, _ = entropy_model(codes[:, :-1], None)  # (B, T, V)
    return entropy_from_logits(logits)


class IncrementalEntropy:
    """Step-by-step scoring with the entropy model's KV cache: start() gives e_0, then
    step(x_{i-1}, i) gives e_i. Call close() (or use as a context manager) to free the cache."""

    def __init__(self, entropy_model, batch: int, dtype: Optional[torch.dtype] = None):
        self.model = entropy_model
        self.batch = batch
        entropy_model.setup_caches(batch, entropy_model.config.block_size, dtype)

    @torch.no_grad()
    def start(self) -> torch.Tensor:
        return entropy_from_logits(self.model.prefill(None, batch=self.batch))  # (B,)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        return entropy_from_logits(self.model.decode_step(tokens, step))  # (B,)

    def close(self) -> None:
        self.model.remove_caches()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
