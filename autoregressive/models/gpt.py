"""LlamaGen's class-conditional GPT (state dicts key-for-key LlamaGen's) and its unconditional
variant, which serves as DPAR's entropy model.

Alignment (teacher forcing): input slots [c, x_0, ..., x_{T-2}] -> logits for x_0..x_{T-1};
slot 0 uses the all-zero RoPE table, slot i >= 1 the grid position of x_{i-1}.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn as nn

from autoregressive.models.loss import LossConfig, teacher_forced_output
from autoregressive.models.modules import (
    LabelEmbedder,
    RMSNorm,
    TransformerBlock,
    TransformerDefaults,
    grid_rope_table,
    init_weights,
    read_length,
    remove_kv_caches,
    setup_kv_caches,
)

MODEL_TYPES = ("c2i", "uncond")


@dataclass
class GPTConfig(TransformerDefaults):
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        grid = math.isqrt(self.block_size)
        if grid * grid != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square token grid")
        if self.model_type == "uncond" and self.cls_token_num != 1:
            raise ValueError("an unconditional model has exactly one start slot (cls_token_num=1)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)


class Transformer(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        if config.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        else:  # a single learned start embedding
            self.cls_embedding = LabelEmbedder(1, config.dim, 0.0)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        rates = [config.drop_path_rate * i / max(config.n_layer - 1, 1) for i in range(config.n_layer)]
        self.layers = nn.ModuleList(TransformerBlock(config, rate) for rate in rates)
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        table = grid_rope_table(config.grid_size, config.head_dim, config.rope_base, config.cls_token_num)
        self.register_buffer("freqs_cis", table, persistent=False)  # (cls + T, head_dim/2, 2)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_weights(self, self.config.initializer_range)
        nn.init.zeros_(self.output.weight)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def _start_embeddings(self, cond_idx: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        if self.config.model_type == "uncond":
            cond_idx = torch.zeros(batch, dtype=torch.long, device=device)
        return self.cls_embedding(cond_idx)[:, : self.config.cls_token_num]  # (B, cls, dim)

    def forward(
        self,
        idx: torch.Tensor,
        cond_idx: Optional[torch.Tensor],
        targets: Optional[torch.Tensor] = None,
        loss_config: LossConfig = LossConfig(),
    ):
        """Teacher-forced pass. idx (B, T-1) codes, cond_idx (B,) classes (ignored when
        unconditional). Returns teacher_forced_output of the final-norm states (B, T, dim):
        (logits (B, T, V) float32, None) (logits[:, t] predicts x_t), or with targets (B, T)
        (None, the mean loss under loss_config)."""
        B = idx.shape[0]
        start = self._start_embeddings(cond_idx, B, idx.device)
        h = self.tok_dropout(torch.cat([start, self.tok_embeddings(idx)], dim=1))  # (B, cls + T-1, dim)
        freqs_cis = self.freqs_cis[None, : h.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs_cis)
        h = self.norm(h)[:, self.config.cls_token_num - 1 :]  # (B, T, dim)
        return teacher_forced_output(h, self.output, targets, loss_config)

    # ---- KV-cached generation -------------------------------------------------------
    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: Optional[torch.dtype] = None) -> None:
        dtype = dtype or self.tok_embeddings.weight.dtype
        setup_kv_caches(self.layers, max_batch_size, max_seq_length, dtype, self.tok_embeddings.weight.device)

    def remove_caches(self) -> None:
        remove_kv_caches(self.layers)

    @property
    def cache_length(self) -> int:
        return self.layers[0].attention.kv_cache.capacity

    def _decode(self, h: torch.Tensor, input_pos: torch.Tensor, length: Optional[int]) -> torch.Tensor:
        """length: host-side bound above every position, so attention reads only that cache prefix."""
        freqs_cis = self.freqs_cis[input_pos]  # (B, S, head_dim/2, 2)
        for layer in self.layers:
            h = layer.decode(h, freqs_cis, input_pos, length=length)
        return self.output(self.norm(h[:, -1])).float()  # (B, V)

    def prefill(self, cond_idx: Optional[torch.Tensor], batch: Optional[int] = None) -> torch.Tensor:
        """Feed the class (or start) slots; returns the logits for x_0, (B, V)."""
        B = cond_idx.shape[0] if cond_idx is not None else batch
        device = self.tok_embeddings.weight.device
        h = self._start_embeddings(cond_idx, B, device)
        input_pos = torch.arange(self.config.cls_token_num, device=device).expand(B, -1)
        return self._decode(h, input_pos, self.config.cls_token_num)

    def step_position(self, batch: int, step: int, read_block: Optional[int] = None):
        """Cache slot of token x_{step-1} as a (batch, 1) tensor, and the read length of that step
        (read_length in blocks of read_block; None = the whole cache)."""
        slot = self.config.cls_token_num + step - 1
        pos = torch.full((batch, 1), slot, device=self.tok_embeddings.weight.device)
        length = self.cache_length if read_block is None else read_length(slot + 1, self.cache_length, read_block)
        return pos, length

    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor, length: int) -> torch.Tensor:
        """One static-shape step (what the fast path compiles): tokens (B,) at cache slots
        input_pos (B, 1), reading `length` slots. Returns the logits of the next tokens (B, V)."""
        return self._decode(self.tok_embeddings(tokens[:, None]), input_pos, length)

    def decode_step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """tokens (B,) = x_{step-1}; returns the logits for x_step, (B, V)."""
        return self.decode(tokens, *self.step_position(tokens.shape[0], step))


# name -> GPTConfig fields of that size; parameter counts at ImageNet 256 (vocab 16384, 1000 classes)
GPT_configs = {
    "GPT-T": dict(n_layer=2, n_head=4, dim=64),  # tests
    "GPT-XS": dict(n_layer=4, n_head=6, dim=192),  # CPU runs
    "GPT-XS8": dict(n_layer=8, n_head=6, dim=192),  # CPU runs at DPAR-B-like proportions (demo.quality_study)
    "GPT-S": dict(n_layer=8, n_head=6, dim=384),  # default entropy model
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),  # 111M
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),  # 343M
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),  # 775M
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),  # 1.4B
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),  # 3.9B
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),  # 1.2B
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),  # 3.1B
}


def _build(name: str, **kwargs) -> Transformer:
    return Transformer(GPTConfig(**{**GPT_configs[name], **kwargs}))


GPT_models = {name: partial(_build, name) for name in GPT_configs}  # LlamaGen's GPT_models[name](**kwargs)
