"""DPAR: token-level encoder -> patch transformer over entropy-defined patches -> token-level decoder.

Alignment (DESIGN.md section 3), for targets x_0..x_{T-1} in patches P_0..P_{M-1}:
  encoder   slots j = 0..T-2 hold x_j (2D RoPE of x_j); E causal token layers; after each
            layer l every patch vector p_m is updated by cross-attention to h^l over P_m
            (p_m initialised as the per-channel max of h^1 over P_m);
  patches   slots [C, p_0, ..., p_{M-2}]; g_m (slot m) has seen C and p_0..p_{m-1};
            slot m >= 1 carries the geometry of P_{m-1} (dynamic RoPE);
  decoder   slots i = 0..T-1 hold u_0 = start vector, u_i = h_{i-1}; before each of the D token
            layers u_i += Linear(Norm(g_{m(i)})); final norm + head give the logits of x_i.
The logits of x_i therefore depend on x_<i only.
"""
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoregressive.models.attention import attend
from autoregressive.models.modules import (
    LabelEmbedder,
    RMSNorm,
    TransformerBlock,
    TransformerDefaults,
    grid_rope_table,
    init_weights,
    remove_kv_caches,
    rope_1d,
    rope_2d,
    rope_dynamic,
    setup_kv_caches,
)

PATCH_ROPE = ("dynamic", "2d", "1d")


@dataclass
class DPARConfig(TransformerDefaults):
    dim: int = 1024
    n_head: int = 16
    n_encoder_layer: int = 1
    n_patch_layer: int = 19
    n_decoder_layer: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    patch_rope: str = "dynamic"

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.cls_token_num != 1:
            raise ValueError("DPAR uses a single class slot (cls_token_num=1)")
        if self.patch_rope not in PATCH_ROPE:
            raise ValueError(f"patch_rope must be one of {PATCH_ROPE}, got {self.patch_rope!r}")
        if self.dim % self.n_head or (self.dim // self.n_head) % 16:
            raise ValueError(f"head dim {self.dim}/{self.n_head} must be a whole multiple of 16")
        if min(self.n_encoder_layer, self.n_patch_layer, self.n_decoder_layer) < 1:
            raise ValueError("DPAR needs at least one encoder, patch and decoder layer")
        grid = math.isqrt(self.block_size)
        if grid * grid != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square token grid")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def n_layer(self) -> int:
        return self.n_encoder_layer + self.n_patch_layer + self.n_decoder_layer


class PatchCrossAttention(nn.Module):
    """p <- p + Attn(Norm(p) as queries, Norm(tokens of the patch) as keys/values).
    Multi-head, no RoPE, no FFN; token states never see the patch vectors."""

    def __init__(self, config: DPARConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.query_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.kv_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wkv = nn.Linear(config.dim, 2 * config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, p: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """p (N, dim) patch vectors; tokens (N, L, dim) each patch's token states; valid (N, L)."""
        N, L, _ = tokens.shape
        q = self.wq(self.query_norm(p)).view(N, self.n_head, 1, self.head_dim)  # (N, H, 1, Dh)
        k, v = self.wkv(self.kv_norm(tokens)).chunk(2, dim=-1)
        k = k.view(N, L, self.n_head, self.head_dim).transpose(1, 2)  # (N, H, L, Dh)
        v = v.view(N, L, self.n_head, self.head_dim).transpose(1, 2)
        out = attend(q, k, v, mask=valid[:, None, None, :])  # (N, H, 1, Dh)
        return p + self.wo(out.reshape(N, self.n_head * self.head_dim))


class PatchInjection(nn.Module):
    """Linear(Norm(g)): what a decoder layer adds to the token stream from its patch's state."""

    def __init__(self, config: DPARConfig):
        super().__init__()
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(g))


def patch_layout(patch_lengths: torch.Tensor, T: int, row_width: int):
    """patch_lengths (B, M) zero padded, each row summing to T -> starts (B, M), patch_ids (B, T)
    and the geometry (row, col_start, col_end) (B, M) of every patch."""
    ends = patch_lengths.cumsum(-1)  # (B, M) one past each patch's last token
    starts = ends - patch_lengths
    token = torch.arange(T, device=patch_lengths.device)
    patch_ids = torch.searchsorted(ends, token.expand(ends.shape[0], T).contiguous(), right=True)  # (B, T)
    last = (ends - 1).clamp(min=0)
    return starts, patch_ids, (starts // row_width, starts % row_width, last % row_width)


def gather_patch_tokens(states: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor):
    """states (B, S, dim) token states; starts, lengths (B, M) -> tokens (B, M, L, dim) and
    valid (B, M, L), L = the longest patch. Tokens at or past S are invalid (a patch that ends
    with the last target token has no encoder state for it); a patch with no valid token gets
    one dummy key so attention stays finite (its result is never used)."""
    B, S, _ = states.shape
    L = max(int(lengths.max()), 1)
    offset = torch.arange(L, device=states.device)
    index = starts[..., None] + offset  # (B, M, L)
    valid = (offset < lengths[..., None]) & (index < S)
    valid[..., 0] |= ~valid.any(-1)
    index = index.clamp(max=S - 1)
    batch = torch.arange(B, device=states.device)[:, None, None]
    return states[batch, index], valid  # (B, M, L, dim), (B, M, L)


class DPAR(nn.Module):
    is_dpar = True

    def __init__(self, config: DPARConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        rates = [config.drop_path_rate * i / max(config.n_layer - 1, 1) for i in range(config.n_layer)]
        E, G = config.n_encoder_layer, config.n_patch_layer
        self.encoder_layers = nn.ModuleList(TransformerBlock(config, r) for r in rates[:E])
        self.patch_cross_attn = nn.ModuleList(PatchCrossAttention(config) for _ in range(E))
        self.patch_layers = nn.ModuleList(TransformerBlock(config, r) for r in rates[E : E + G])
        self.decoder_start = nn.Parameter(torch.zeros(config.dim))
        self.patch_injections = nn.ModuleList(PatchInjection(config) for _ in range(config.n_decoder_layer))
        self.decoder_layers = nn.ModuleList(TransformerBlock(config, r) for r in rates[E + G :])
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        table = grid_rope_table(config.grid_size, config.head_dim, config.rope_base, 1)
        self.register_buffer("freqs_cis", table, persistent=False)  # (1 + T, head_dim/2, 2)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_weights(self, self.config.initializer_range)
        nn.init.normal_(self.decoder_start, std=self.config.initializer_range)
        nn.init.zeros_(self.output.weight)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # ---- pieces shared by teacher forcing and generation --------------------------------
    def pool_patches(self, layer_tokens: List[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """layer_tokens: per encoder layer l, h^l over each patch (N, L, dim); valid (N, L).
        Returns the patch vectors p (N, dim)."""
        first = layer_tokens[0].masked_fill(~valid[..., None], float("-inf"))
        p = first.max(dim=1).values  # (N, dim)
        for cross_attn, tokens in zip(self.patch_cross_attn, layer_tokens):
            p = cross_attn(p, tokens, valid)
        return p

    def patch_rope(self, slot: torch.Tensor, row, col_start, col_end) -> torch.Tensor:
        """RoPE of patch-transformer slots. slot (B, S) slot index (0 = class); geometry
        (B, S) of the patch each slot holds. -> (B, S, head_dim/2, 2)."""
        hd, base = self.config.head_dim, self.config.rope_base
        if self.config.patch_rope == "dynamic":
            table = rope_dynamic(row, col_start, col_end, hd, base)
        elif self.config.patch_rope == "2d":
            table = rope_2d(row, col_start, hd, base)
        else:
            table = rope_1d(slot - 1, hd, base)
        return table.masked_fill((slot == 0)[..., None, None], 0.0)

    # ---- teacher forcing ---------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        cond_idx: torch.Tensor,
        patch_lengths: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
    ):
        """idx (B, T-1) inputs x_0..x_{T-2}; cond_idx (B,); patch_lengths (B, M) zero-padded
        lengths over the T targets. Returns logits (B, T, V) float32 and the mean cross-entropy
        against targets (B, T) (None without targets)."""
        B, T = idx.shape[0], idx.shape[1] + 1
        W = self.config.grid_size
        starts, patch_ids, (row, col_start, col_end) = patch_layout(patch_lengths, T, W)
        M = patch_lengths.shape[1]

        # encoder over x_0..x_{T-2}, pooling after every layer
        h = self.tok_dropout(self.tok_embeddings(idx))  # (B, T-1, dim)
        enc_freqs = self.freqs_cis[None, 1:T]
        layer_states = []
        for layer in self.encoder_layers if T > 1 else []:
            h = layer(h, enc_freqs)
            layer_states.append(h)
        if layer_states:
            gathered = [gather_patch_tokens(s, starts, patch_lengths) for s in layer_states]
            valid = gathered[0][1].flatten(0, 1)  # (B*M, L)
            tokens = [g.flatten(0, 1) for g, _ in gathered]  # per layer (B*M, L, dim)
            p = self.pool_patches(tokens, valid).view(B, M, -1)  # (B, M, dim)
        else:
            p = h.new_zeros(B, M, self.config.dim)

        # patch transformer over [C, p_0, ..., p_{M-2}]
        x = torch.cat([self.cls_embedding(cond_idx), p[:, : M - 1]], dim=1)  # (B, M, dim)
        x = self.tok_dropout(x)
        slot = torch.arange(M, device=idx.device).expand(B, M)
        prev = lambda t: F.pad(t[:, : M - 1], (1, 0))  # slot m holds patch m-1
        patch_freqs = self.patch_rope(slot, prev(row), prev(col_start), prev(col_end))
        for layer in self.patch_layers:
            x = layer(x, patch_freqs)
        g = x  # (B, M, dim)

        # decoder over [start, h_0, ..., h_{T-2}]
        u = torch.cat([self.decoder_start.expand(B, 1, -1).to(h.dtype), h], dim=1)  # (B, T, dim)
        dec_freqs = self.freqs_cis[None, :T]
        gather_ids = patch_ids[..., None].expand(B, T, self.config.dim)
        for inject, layer in zip(self.patch_injections, self.decoder_layers):
            u = u + torch.gather(inject(g), 1, gather_ids)  # (B, T, dim)
            u = layer(u, dec_freqs)
        logits = self.output(self.norm(u)).float()  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    # ---- incremental generation (see generate.generate_dpar) ---------------------------
    def setup_caches(self, max_batch_size: int, dtype: Optional[torch.dtype] = None) -> None:
        dtype = dtype or self.tok_embeddings.weight.dtype
        device, T = self.tok_embeddings.weight.device, self.config.block_size
        for layers in (self.encoder_layers, self.patch_layers, self.decoder_layers):
            setup_kv_caches(layers, max_batch_size, T, dtype, device)

    def remove_caches(self) -> None:
        for layers in (self.encoder_layers, self.patch_layers, self.decoder_layers):
            remove_kv_caches(layers)

    def encode_step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """tokens (n,) = x_step at encoder slot `step` -> states after every layer (n, E, dim)."""
        h = self.tok_embeddings(tokens[:, None])  # (n, 1, dim)
        pos = torch.full((tokens.shape[0], 1), step, device=tokens.device)
        freqs = self.freqs_cis[pos + 1]  # (n, 1, head_dim/2, 2)
        states = []
        for layer in self.encoder_layers:
            h = layer.decode(h, freqs, pos)
            states.append(h[:, 0])
        return torch.stack(states, dim=1)

    def patch_step(self, x: torch.Tensor, rows: torch.Tensor, slot: torch.Tensor, geometry) -> torch.Tensor:
        """Advance the patch transformer by one slot for the cache rows `rows` (n,), each at its
        own slot (n,). x (n, dim) is the class embedding (slot 0) or the finished patch vector;
        geometry = (row, col_start, col_end) (n,) of that patch. Returns g (n, dim)."""
        slot = slot[:, None]  # (n, 1)
        freqs = self.patch_rope(slot, *(t[:, None] for t in geometry))
        h = x[:, None]
        for layer in self.patch_layers:
            h = layer.decode(h, freqs, slot, rows)
        return h[:, 0]

    def injections(self, g: torch.Tensor) -> torch.Tensor:
        """g (n, dim) -> what each decoder layer adds for tokens of that patch (n, D, dim)."""
        return torch.stack([inject(g) for inject in self.patch_injections], dim=1)

    def decode_step(self, u: torch.Tensor, injections: torch.Tensor, step: int) -> torch.Tensor:
        """u (n, dim) decoder input of slot `step`; injections (n, D, dim) -> logits (n, V)."""
        pos = torch.full((u.shape[0], 1), step, device=u.device)
        freqs = self.freqs_cis[pos]
        h = u[:, None]
        for l, layer in enumerate(self.decoder_layers):
            h = layer.decode(h + injections[:, l, None], freqs, pos)
        return self.output(self.norm(h[:, 0])).float()


def _factory(n_encoder_layer: int, n_patch_layer: int, n_decoder_layer: int, n_head: int, dim: int):
    def build(**kwargs) -> DPAR:
        depths = dict(n_encoder_layer=n_encoder_layer, n_patch_layer=n_patch_layer, n_decoder_layer=n_decoder_layer)
        return DPAR(DPARConfig(n_head=n_head, dim=dim, **{**depths, **kwargs}))

    return build


# (E, G, D, heads, dim): same total depth as the GPT of the same size
DPAR_models = {
    "DPAR-T": _factory(1, 1, 1, 4, 64),  # tests
    "DPAR-XS": _factory(1, 2, 1, 6, 192),  # CPU runs
    "DPAR-S": _factory(1, 5, 2, 6, 384),
    "DPAR-B": _factory(1, 8, 3, 12, 768),
    "DPAR-L": _factory(1, 19, 4, 16, 1024),
    "DPAR-XL": _factory(1, 30, 5, 20, 1280),
    "DPAR-XXL": _factory(1, 41, 6, 24, 1536),
}
