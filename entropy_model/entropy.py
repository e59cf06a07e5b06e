"""Next-token entropies of the (unconditional GPT) entropy model, teacher-forced or step by step."""
from typing import Callable, Optional

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
    step(x_{i-1}, i) gives e_i. Call close() (or use as a context manager) to free the cache.

    read_block: steps read the cache in blocks of this many slots (None: the whole cache);
    wrap: applied once to the step function (generation passes torch.compile here);
    keep_cache: close() leaves the cache attached for the next batch of the same size."""

    def __init__(self, entropy_model, batch: int, dtype: Optional[torch.dtype] = None,
                 read_block: Optional[int] = None, wrap: Optional[Callable] = None, keep_cache: bool = False):
        self.model = entropy_model
        self.batch = batch
        self.read_block = read_block
        self.keep_cache = keep_cache
        self._step = wrap(self._entropy) if wrap is not None else self._entropy
        entropy_model.setup_caches(batch, entropy_model.config.cls_token_num + entropy_model.config.block_size, dtype)

    def _entropy(self, tokens: torch.Tensor, input_pos: torch.Tensor, length: int) -> torch.Tensor:
        return entropy_from_logits(self.model.decode(tokens, input_pos, length))  # (B,)

    @torch.no_grad()
    def start(self) -> torch.Tensor:
        return entropy_from_logits(self.model.prefill(None, batch=self.batch))  # (B,)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        return self._step(tokens, *self.model.step_position(tokens.shape[0], step, self.read_block))  # (B,)

    def close(self) -> None:
        if not self.keep_cache:
            self.model.remove_caches()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
