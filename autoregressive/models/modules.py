"""Transformer building blocks shared by the LlamaGen GPT, the entropy model and DPAR.

Parameter names follow LlamaGen (attention.wqkv, attention.wo, feed_forward.w1/w2/w3,
attention_norm, ffn_norm, cls_embedding.embedding_table) so released checkpoints load strict.

Every block has two explicit modes:
  forward(x, freqs_cis, documents=None)      teacher-forced, causal over the S positions of x, or,
                                             with `documents`, over each packed document of x (1, N);
  decode(x, freqs_cis, input_pos, length)    KV-cached: writes keys/values of cache rows 0..B-1 at
                                             input_pos (per row) and attends to the cache (its
                                             first `length` slots when that bound is given).
Positions, RoPE tables and masks are per row, because DPAR rows advance independently.
"""
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from autoregressive.models.attention import Documents, attend, cached_attend, cached_attend_rows


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


class BlockConfig(Protocol):
    """Fields a transformer block reads; GPTConfig and DPARConfig both provide them."""

    dim: int
    n_head: int
    n_kv_head: int
    multiple_of: int
    ffn_dim_multiplier: Optional[float]
    norm_eps: float
    attn_dropout_p: float
    resid_dropout_p: float
    ffn_dropout_p: float


# --------------------------------------------------------------------------------------
# Rotary position embeddings. A table has shape (..., head_dim // 2, 2) holding (cos, sin)
# per rotary pair; pairs are consecutive (even, odd) channels as in LlamaGen.
# --------------------------------------------------------------------------------------
def rope_frequencies(n_pairs: int, denominator: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """theta_j = base^(-2j / denominator) for j < n_pairs, float32 (n_pairs,), built on `device`
    (inside a step or a training forward: the device of the positions, so no host copy)."""
    exponents = torch.arange(0, 2 * n_pairs, 2, dtype=torch.float32, device=device)[:n_pairs]
    return 1.0 / (base ** (exponents / denominator))


def rope_table(angles: torch.Tensor, zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., n_pairs) rotation angles -> (..., n_pairs, 2) (cos, sin) table.
    `zero` (broadcastable bool to angles[..., 0]) marks slots given the all-zero table
    (LlamaGen's class-token convention, which zeroes that slot's queries and keys)."""
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    if zero is not None:
        table = table.masked_fill(zero[..., None, None], 0.0)
    return table


def rope_2d(row: torch.Tensor, col: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """LlamaGen's 2D RoPE: the first head_dim/4 pairs rotate by row, the rest by column,
    both with theta_j = base^(-2j/(head_dim/2)). row, col (...,) -> (..., head_dim/2, 2)."""
    freqs = rope_frequencies(head_dim // 4, head_dim // 2, base, row.device)
    angles = torch.cat([row.float()[..., None] * freqs, col.float()[..., None] * freqs], dim=-1)
    return rope_table(angles)


def rope_1d(position: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Plain 1D RoPE over head_dim/2 pairs. position (...,) -> (..., head_dim/2, 2)."""
    freqs = rope_frequencies(head_dim // 2, head_dim, base, position.device)
    return rope_table(position.float()[..., None] * freqs)


def rope_dynamic(
    row: torch.Tensor, col_start: torch.Tensor, col_end: torch.Tensor, head_dim: int, base: float = 10000.0
) -> torch.Tensor:
    """DPAR's dynamic RoPE for a patch: head_dim/4 pairs rotate by the patch's row with
    theta_j = base^(-2j/(head_dim/2)); four groups of head_dim/16 pairs rotate by col_start,
    col_end, col_end, col_start with theta_j = base^(-2j/(head_dim/8)).
    row, col_start, col_end (...,) -> (..., head_dim/2, 2)."""
    if head_dim % 16:
        raise ValueError(f"dynamic RoPE needs a head dim that is a multiple of 16, got {head_dim}")
    row_freqs = rope_frequencies(head_dim // 4, head_dim // 2, base, row.device)
    col_freqs = rope_frequencies(head_dim // 16, head_dim // 8, base, row.device)
    cs, ce = col_start.float()[..., None], col_end.float()[..., None]
    angles = torch.cat(
        [row.float()[..., None] * row_freqs, cs * col_freqs, ce * col_freqs, ce * col_freqs, cs * col_freqs], dim=-1
    )
    return rope_table(angles)


def grid_rope_table(grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> torch.Tensor:
    """LlamaGen's GPT table: cls_token_num all-zero slots, then the raster grid positions.
    -> (cls_token_num + grid_size**2, head_dim/2, 2)."""
    index = torch.arange(grid_size * grid_size)
    grid = rope_2d(index // grid_size, index % grid_size, head_dim, base)
    return torch.cat([torch.zeros(cls_token_num, head_dim // 2, 2), grid])


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D); freqs_cis (B or 1, S, D/2, 2). Rotation computed in float32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, S, H, D/2, 2)
    f = freqs_cis[:, :, None]  # (B, S, 1, D/2, 2)
    out = torch.stack(
        [xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1], xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], dim=-1
    )
    return out.flatten(3).type_as(x)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU with LlamaGen's hidden size find_multiple(int(2 * 4 * dim / 3), multiple_of)."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        hidden = int(2 * (4 * config.dim) / 3)
        if config.ffn_dim_multiplier is not None:
            hidden = int(config.ffn_dim_multiplier * hidden)
        hidden = find_multiple(hidden, config.multiple_of)
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """Static per-layer cache (gpt-fast style) written at explicit per-row positions.

    Reads have static shapes: a decode step reads the first `length` slots of rows 0..n-1 as a
    view (no copy), where `length` comes from a small fixed set (read_length), and masks the
    slots past each row's position; no read depends on a value held on the device. The buffers
    hold one spare slot past `capacity` that no read reaches, so every read is a strided view
    of one layout (a read of the whole buffer would be contiguous, and compiled steps guard
    on that)."""

    def __init__(self, max_batch_size: int, max_seq_length: int, n_head: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch_size, max_seq_length + 1, n_head, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def capacity(self) -> int:
        """Slots a row can hold (and the longest read)."""
        return self.k_cache.shape[1] - 1

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: Optional[int] = None):
        """input_pos (n, S) positions; k, v (n, S, H, D) of cache rows 0..n-1; length: the read
        covers cache slots 0..length-1 only (a host-side bound above every position in input_pos,
        at most capacity; None = capacity). Returns the keys/values of those rows (n, L, H, D),
        views of the cache, L = length or capacity; each row's own prefix (its position + 1
        slots) is what attention reads of them (cached_attend)."""
        n = k.shape[0]
        L = self.capacity if length is None else length
        batch = torch.arange(n, device=k.device)[:, None]  # (n, 1)
        self.k_cache[batch, input_pos] = k
        self.v_cache[batch, input_pos] = v
        return self.k_cache[:n, :L], self.v_cache[:n, :L]  # (n, L, H, D) views

    def write_rows(self, rows: torch.Tensor, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (n, S, H, D) of cache rows `rows` (n,) (distinct) at positions input_pos (n, S)."""
        self.k_cache[rows[:, None], input_pos] = k
        self.v_cache[rows[:, None], input_pos] = v


def read_length(needed: int, capacity: int, block: int) -> int:
    """Cache slots a decode step reads: the smallest of block x (2, 3, 4, 6, 8, 12, 16, ...)
    (half-octave steps from two blocks) that covers `needed`, at most `capacity`. A step thus
    reads at most 1.5x the slots it needs (2x below two blocks), and a whole generation sees
    about 2 log2(capacity / block) distinct key lengths (8 for 577 slots in blocks of 32)."""
    if needed < 1 or block < 1:
        raise ValueError(f"needed and block must be >= 1, got {needed} and {block}")
    blocks = 2
    while blocks * block < needed:
        blocks = blocks * 3 // 2 if blocks & (blocks - 1) == 0 else blocks * 4 // 3
    return min(capacity, blocks * block)


# Attention kernels for KV-cached decoding, pinned so that no step depends on a per-shape
# choice (cuDNN attention builds a new plan for every key length). The generation loops run in
# decode_attention(), entered outside every compiled step function: a context manager inside a
# compiled function keeps its graph out of the AOTAutograd cache.
DECODE_ATTENTION = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def decode_attention():
    """The context the decode steps run in: SDPA restricted to DECODE_ATTENTION."""
    return sdpa_kernel(list(DECODE_ATTENTION))


class Attention(nn.Module):
    def __init__(self, config: BlockConfig):
        super().__init__()
        assert config.dim % config.n_head == 0
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.dim // config.n_head
        total = (config.n_head + 2 * config.n_kv_head) * self.head_dim
        self.wqkv = nn.Linear(config.dim, total, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)
        self.kv_cache: Optional[KVCache] = None

    def _qkv(self, x: torch.Tensor, freqs_cis: torch.Tensor):
        B, S, _ = x.shape
        kv_size = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv_size, kv_size], dim=-1)
        q = apply_rotary_emb(q.view(B, S, self.n_head, self.head_dim), freqs_cis)  # (B, S, H, D)
        k = apply_rotary_emb(k.view(B, S, self.n_kv_head, self.head_dim), freqs_cis)  # (B, S, Hkv, D)
        return q, k, v.view(B, S, self.n_kv_head, self.head_dim)

    def _heads(self, q, k, v):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        return q, k, v

    def _out(self, out: torch.Tensor) -> torch.Tensor:
        B, S = out.shape[0], out.shape[2]
        out = out.transpose(1, 2).reshape(B, S, self.n_head * self.head_dim)  # (B, S, dim)
        return self.resid_dropout(self.wo(out))

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, documents: Optional[Documents] = None) -> torch.Tensor:
        q, k, v = self._heads(*self._qkv(x, freqs_cis))
        dropout = self.attn_dropout_p if self.training else 0.0
        return self._out(attend(q, k, v, dropout_p=dropout, documents=documents))  # (B, S, dim)

    def decode(self, x, freqs_cis, input_pos: torch.Tensor, length: Optional[int] = None,
               reads: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (n, S, dim) of cache rows 0..n-1, or with `rows` (n,) of those cache rows (distinct;
        one position each, S = 1). reads (n,) bool: the rows whose output is used (the others may
        read no cache slot)."""
        q, k, v = self._qkv(x, freqs_cis)
        if rows is None:
            k, v = self.kv_cache.update(input_pos, k, v, length)
            q, k, v = self._heads(q, k, v)
            return self._out(cached_attend(q, k, v, input_pos, reads))
        self.kv_cache.write_rows(rows, input_pos, k, v)
        cache = self.kv_cache
        L = cache.capacity if length is None else length
        out = cached_attend_rows(q.transpose(1, 2), cache.k_cache, cache.v_cache, rows, input_pos, L, reads)
        return self._out(out)  # (n, 1, dim)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at rate 0 or in eval mode); with packed
    documents, per document (a sample's slots are dropped together)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor, documents: Optional[Documents] = None) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        if documents is None:
            keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.rate)
        else:
            keep = x.new_empty(documents.num_docs).bernoulli_(1 - self.rate)[documents.doc_ids][None, :, None]
        return x * keep / (1 - self.rate)


class TransformerBlock(nn.Module):
    def __init__(self, config: BlockConfig, drop_path: float = 0.0):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path = DropPath(drop_path)

    def _ffn(self, h: torch.Tensor, documents: Optional[Documents] = None) -> torch.Tensor:
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)), documents)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, documents: Optional[Documents] = None) -> torch.Tensor:
        """x (B, S, dim) -> (B, S, dim); with documents, x (1, N, dim) holds packed documents."""
        h = x + self.drop_path(self.attention(self.attention_norm(x), freqs_cis, documents), documents)
        return self._ffn(h, documents)

    def decode(self, x, freqs_cis, input_pos: torch.Tensor, length: Optional[int] = None,
               reads: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """KV-cached step of cache rows 0..B-1, or of cache rows `rows` (see KVCache.update for
        length, Attention.decode for reads and rows)."""
        h = x + self.attention.decode(self.attention_norm(x), freqs_cis, input_pos, length, reads, rows)
        return self._ffn(h)


def setup_kv_caches(layers: nn.ModuleList, max_batch_size: int, max_seq_length: int, dtype, device) -> None:
    """Attach a cache to every layer; caches of the same shape, dtype and device are kept (their
    buffers keep their addresses, which captured CUDA graphs rely on)."""
    for layer in layers:
        attn = layer.attention
        shape = (max_batch_size, max_seq_length, attn.n_kv_head, attn.head_dim)
        old = attn.kv_cache
        if old is not None and (old.k_cache.shape[0], old.capacity, *old.k_cache.shape[2:], old.k_cache.dtype,
                                old.k_cache.device) == (*shape, dtype, torch.device(device)):
            continue
        attn.kv_cache = KVCache(max_batch_size, max_seq_length, attn.n_kv_head, attn.head_dim, dtype, device)


def remove_kv_caches(layers: nn.ModuleList) -> None:
    for layer in layers:
        layer.attention.kv_cache = None


class LabelEmbedder(nn.Module):
    """Class embedding table; with class dropout > 0 it has a last row for the null class
    (classifier-free guidance). Label dropout itself is applied to the batch by the trainer
    (`drop_labels`), so the module's forward never depends on self.training."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, dim)


def drop_labels(labels: torch.Tensor, prob: float, null_class: int, generator: Optional[torch.Generator] = None):
    """Replace each label by the null class with probability `prob` (guidance training)."""
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device="cpu").to(labels.device) < prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)


@dataclass
class TransformerDefaults:
    """LlamaGen's block defaults, shared by GPTConfig and DPARConfig."""

    n_kv_head: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0


def init_weights(module: nn.Module, std: float) -> None:
    """LlamaGen's initialisation: normal(0, std) for linear and embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
