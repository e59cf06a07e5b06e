"""DPAR: token-level encoder -> patch transformer over entropy-defined patches -> token-level decoder.

Alignment (docs/design.md, "The DPAR model: causal alignment"), for targets x_0..x_{T-1} in
patches P_0..P_{M-1}:
  encoder   slots j = 0..T-2 hold x_j (2D RoPE of x_j); E causal token layers; after each
            layer l every patch vector p_m is updated by cross-attention to h^l over P_m
            (p_m initialised as the per-channel max of h^1 over P_m);
  patches   slots [C, p_0, ..., p_{M-2}]; g_m (slot m) has seen C and p_0..p_{m-1};
            slot m >= 1 carries the geometry of P_{m-1} (dynamic RoPE);
  decoder   slots i = 0..T-1 hold u_0 = start vector, u_i = h_{i-1}; before each of the D token
            layers u_i += Linear(Norm(g_{m(i)})); final norm + head give the logits of x_i.
The logits of x_i therefore depend on x_<i only.

Training layout (PatchLayout, built once per batch): the patch transformer's slots are either
padded (one row of M_max slots per image) or packed (every image's M_b slots back to back in one
row, padded to a multiple of `pack_multiple` with slots that form their own document; attention
is document-causal). Pooling tokens into patches and broadcasting patch states back to tokens
are index_add / index_select over flat slot indices, never per-patch loops or (B, M, L, dim)
copies.
"""
import math
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoregressive.models.attention import Documents, build_documents, segment_attend
from autoregressive.models.loss import LossConfig, teacher_forced_output
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
PATCH_INIT = ("llamagen", "blt")
PATCH_PACKING = ("auto", "packed", "padded")
DOCUMENT_GRID_MULTIPLE = 64  # SDPA's document grid length is bucketed to this (few compiled shapes)


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
    patch_packing: str = "auto"  # patch-transformer layout; auto = whichever runs fewer slots
    pack_multiple: int = 128  # packed length is padded to a multiple of this (few compiled shapes)
    # The authors build the token encoder and decoder with every dropout 0 and no drop path in
    # the encoder, and apply token dropout to the patch sequence only; the patch transformer
    # keeps LlamaGen's dropouts. True restores LlamaGen's dropouts everywhere (ablation).
    local_dropout: bool = False
    # Cross-attention and patch-injection projections: "llamagen" = normal(initializer_range)
    # like every other linear layer (what the authors' model ends up with: its top-level
    # initialize_weights re-initialises every nn.Linear after the local modules' own init);
    # "blt" = truncated normal, std dim^-0.5, cut at +-3 std (BLT's init, which the authors'
    # local modules set first).
    patch_init: str = "llamagen"

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.cls_token_num != 1:
            raise ValueError("DPAR uses a single class slot (cls_token_num=1)")
        if self.patch_rope not in PATCH_ROPE:
            raise ValueError(f"patch_rope must be one of {PATCH_ROPE}, got {self.patch_rope!r}")
        if self.patch_init not in PATCH_INIT:
            raise ValueError(f"patch_init must be one of {PATCH_INIT}, got {self.patch_init!r}")
        if self.patch_packing not in PATCH_PACKING:
            raise ValueError(f"patch_packing must be one of {PATCH_PACKING}, got {self.patch_packing!r}")
        if self.pack_multiple < 1:
            raise ValueError(f"pack_multiple must be >= 1, got {self.pack_multiple}")
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

    @property
    def local_block_config(self) -> "DPARConfig":
        """The settings of the token encoder and decoder blocks (see local_dropout)."""
        if self.local_dropout:
            return self
        return replace(self, attn_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)


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

    def forward(self, p: torch.Tensor, tokens: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        """p (n, dim) patch vectors; tokens (K, dim) token states; segment (K,) the patch
        (row of p) each token belongs to, n for tokens of no patch (their keys/values are
        computed but unused). Returns the updated p (n, dim)."""
        n, K = p.shape[0], tokens.shape[0]
        q = self.wq(self.query_norm(p)).view(n, self.n_head, self.head_dim)  # (n, H, Dh)
        k, v = self.wkv(self.kv_norm(tokens)).chunk(2, dim=-1)
        k = k.reshape(K, self.n_head, self.head_dim)  # (K, H, Dh)
        v = v.reshape(K, self.n_head, self.head_dim)
        out = segment_attend(q, k, v, segment)  # (n, H, Dh)
        return p + self.wo(out.reshape(n, self.n_head * self.head_dim))

    def projections(self) -> List[nn.Linear]:
        return [self.wq, self.wkv, self.wo]


class PatchInjection(nn.Module):
    """Linear(Norm(g)): what a decoder layer adds to the token stream from its patch's state."""

    def __init__(self, config: DPARConfig):
        super().__init__()
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(g))

    def projections(self) -> List[nn.Linear]:
        return [self.proj]


@dataclass
class PatchLayout:
    """Where every token and patch of one batch goes; built once per batch by
    build_patch_layout (on the host, e.g. in a data worker) and shared by every layer.

    The patch transformer runs on slots laid out as `slot_geometry`'s (R, S): padded, R = B rows
    of S = M_max slots (image b's sequence [C, p_0, ..., p_{M_b-2}] from slot 0 of row b), or
    packed, R = 1 row of S = N slots holding the images' sequences back to back (then
    `documents` describes them). Flat slot index = row * S + position.

    token_slot     (B, T-1) flat slot pooling encoder token x_j (slot of p_{m(j)}), or n_slots
                   for tokens of an image's last patch (never pooled)
    decoder_slot   (B, T) flat slot whose output g_{m(i)} conditions token i
    class_slot     (B,) flat slot holding each image's class embedding
    slot_geometry  (R, S, 4) int64 per slot: index within its image's sequence (0 = class),
                   then row, col_start, col_end of the patch it holds (zeros for slot 0/padding)
    documents      packed layouts only
    """

    token_slot: torch.Tensor
    decoder_slot: torch.Tensor
    class_slot: torch.Tensor
    slot_geometry: torch.Tensor
    documents: Optional[Documents] = None

    @property
    def n_slots(self) -> int:
        return self.slot_geometry.shape[0] * self.slot_geometry.shape[1]

    @property
    def packed(self) -> bool:
        return self.documents is not None

    def to(self, device: Union[torch.device, str], non_blocking: bool = False) -> "PatchLayout":
        """The layout on `device`, its documents prepared for that device's attention backend
        (flex: the block mask is built here, outside any compiled forward)."""
        moved = self._map(lambda t: t.to(device, non_blocking=non_blocking))
        return replace(moved, documents=moved.documents.prepare()) if moved.packed else moved

    def pin_memory(self) -> "PatchLayout":
        """Page-locked copies (DataLoader(pin_memory=True) calls this), for non_blocking .to()."""
        return self._map(lambda t: t.pin_memory())

    def mark_dynamic(self) -> "PatchLayout":
        """Mark the dimensions that change from batch to batch (the slot count S, and with packing
        the packed slots and the SDPA grid length) as dynamic for torch.compile, so that the first
        compiled forward is already the shape-generic graph (no throw-away graph specialised to
        the first batch). Returns self."""
        from torch._dynamo import maybe_mark_dynamic

        maybe_mark_dynamic(self.slot_geometry, 1)
        if self.documents is not None:
            for t in (self.documents.doc_ids, self.documents.slot_index):
                maybe_mark_dynamic(t, 0)
            maybe_mark_dynamic(self.documents.grid_index, 1)
        return self

    def _map(self, fn) -> "PatchLayout":
        names = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        return replace(self, **{name: fn(getattr(self, name)) for name in names})


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def packed_slots(counts: torch.Tensor, multiple: int) -> int:
    """Slots of the packed layout for images with `counts` (B,) patch-transformer slots each:
    their sum plus at least one padding slot, rounded up to a multiple."""
    return _round_up(int(counts.sum()) + 1, multiple)


def uses_packing(config: DPARConfig, patch_lengths: torch.Tensor) -> bool:
    """Whether a batch with patch lengths (B, M) uses the packed layout. "auto" takes the layout
    that runs fewer patch-transformer slots: packed for real batches, whose patch counts differ,
    padded for a single image or equal counts (where packing would only add bucket padding)."""
    if config.patch_packing != "auto":
        return config.patch_packing == "packed"
    counts = (patch_lengths > 0).sum(-1)
    return packed_slots(counts, config.pack_multiple) < patch_lengths.numel()


def build_patch_layout(
    patch_lengths: torch.Tensor,
    config: DPARConfig,
    packed: Optional[bool] = None,
) -> PatchLayout:
    """Layout of a batch with zero-padded patch lengths (B, M) over T targets (each row sums to T).
    packed: None = as config.patch_packing says (uses_packing). Packed layouts hold sum_b M_b slots
    padded up to a multiple of config.pack_multiple (at least one padding slot). Reads the
    lengths on the host, so build it where they live (CPU, e.g. in a data worker) and move the
    result with .to(device, non_blocking=True)."""
    W = config.grid_size
    if patch_lengths.ndim != 2 or patch_lengths.shape[1] < 1:
        raise ValueError(f"patch_lengths must be (B, M) with M >= 1, got {tuple(patch_lengths.shape)}")
    lengths = patch_lengths.long()
    B, M = lengths.shape
    totals = lengths.sum(-1)  # (B,)
    T = int(totals[0])
    if bool((totals != T).any()) or bool((lengths < 0).any()):
        raise ValueError(f"patch lengths must be >= 0 and cover the same tokens in every row, got {totals.tolist()}")
    dev = lengths.device
    if packed is None:
        packed = uses_packing(config, lengths)
    counts = (lengths > 0).sum(-1)  # (B,) M_b: slots of image b
    ends = lengths.cumsum(-1)  # (B, M) one past each patch's last token
    starts = ends - lengths
    token = torch.arange(T, device=dev)
    patch_ids = torch.searchsorted(ends, token.expand(B, T).contiguous(), right=True)  # (B, T) m(i)
    last = (ends - 1).clamp(min=0)
    geometry = torch.stack([starts // W, starts % W, last % W], dim=-1)  # (B, M, 3) of each patch
    if packed:
        n_real = int(counts.sum())
        n_slots = packed_slots(counts, config.pack_multiple)
        base = counts.cumsum(0) - counts  # (B,) first slot of each image
        image = torch.repeat_interleave(torch.arange(B, device=dev), counts)  # (n_real,)
        index = torch.arange(n_real, device=dev) - base[image]  # (n_real,) slot within its image
        held = geometry[image, (index - 1).clamp(min=0)] * (index > 0)[:, None]  # (n_real, 3)
        slot_geometry = torch.zeros(n_slots, 4, dtype=torch.long, device=dev)
        slot_geometry[:n_real] = torch.cat([index[:, None], held], dim=-1)
        slot_geometry = slot_geometry[None]  # (1, N, 4)
        # the bound covers the padding document too (up to pack_multiple slots, more than T for small grids)
        bound = max(T, config.pack_multiple)
        documents = build_documents(counts, n_slots, max_seqlen=bound, grid_multiple=DOCUMENT_GRID_MULTIPLE)
    else:
        n_slots = B * M
        base = torch.arange(B, device=dev) * M
        held = F.pad(geometry[:, : M - 1], (0, 0, 1, 0))  # (B, M, 3): slot s holds patch s-1
        slot = torch.arange(M, device=dev).expand(B, M)
        slot_geometry = torch.cat([slot[..., None], held], dim=-1)  # (B, M, 4)
        documents = None
    m = patch_ids[:, : T - 1]  # (B, T-1) patch of encoder token x_j
    token_slot = torch.where(m < counts[:, None] - 1, base[:, None] + m + 1, n_slots)
    return PatchLayout(
        token_slot=token_slot,
        decoder_slot=base[:, None] + patch_ids,
        class_slot=base,
        slot_geometry=slot_geometry,
        documents=documents,
    )


class DPAR(nn.Module):
    def __init__(self, config: DPARConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)  # on the patch sequence
        self.encoder_dropout = nn.Dropout(config.token_dropout_p if config.local_dropout else 0.0)
        rates = [config.drop_path_rate * i / max(config.n_layer - 1, 1) for i in range(config.n_layer)]
        E, G = config.n_encoder_layer, config.n_patch_layer
        if not config.local_dropout:
            rates[:E] = [0.0] * E
        local = config.local_block_config
        self.encoder_layers = nn.ModuleList(TransformerBlock(local, r) for r in rates[:E])
        self.patch_cross_attn = nn.ModuleList(PatchCrossAttention(config) for _ in range(E))
        self.patch_layers = nn.ModuleList(TransformerBlock(config, r) for r in rates[E : E + G])
        self.decoder_start = nn.Parameter(torch.zeros(config.dim))
        self.patch_injections = nn.ModuleList(PatchInjection(config) for _ in range(config.n_decoder_layer))
        self.decoder_layers = nn.ModuleList(TransformerBlock(local, r) for r in rates[E + G :])
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        table = grid_rope_table(config.grid_size, config.head_dim, config.rope_base, 1)
        self.register_buffer("freqs_cis", table, persistent=False)  # (1 + T, head_dim/2, 2)
        self.decode_buffers: Optional[DecodeBuffers] = None  # set by setup_caches
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_weights(self, self.config.initializer_range)
        nn.init.normal_(self.decoder_start, std=self.config.initializer_range)
        nn.init.zeros_(self.output.weight)
        if self.config.patch_init == "blt":
            std = self.config.dim**-0.5
            for module in [*self.patch_cross_attn, *self.patch_injections]:
                for linear in module.projections():
                    nn.init.trunc_normal_(linear.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # ---- pieces shared by teacher forcing and generation --------------------------------
    def pool(self, states: List[torch.Tensor], segment: torch.Tensor, n: int) -> torch.Tensor:
        """Patch vectors from token states. states: per encoder layer l, h^l of K tokens (K, dim);
        segment (K,) the patch (0..n-1) of each token, or n for tokens pooled nowhere.
        Returns p (n, dim): max of h^1 over the patch, then one cross-attention per layer
        (zeros for patches without tokens)."""
        first = states[0]
        index = segment[:, None].expand_as(first)
        p = first.new_zeros(n + 1, first.shape[1]).scatter_reduce(0, index, first, "amax", include_self=False)
        p = p[:n]  # (n, dim); row n collected the tokens of no patch
        for cross_attn, tokens in zip(self.patch_cross_attn, states):
            p = cross_attn(p, tokens, segment)
        return p

    def pool_patches(self, layer_tokens: List[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """layer_tokens: per encoder layer l, h^l over each patch (N, L, dim); valid (N, L).
        Returns the patch vectors p (N, dim)."""
        N, L = valid.shape
        rows = torch.arange(N, device=valid.device)[:, None].expand(N, L)
        segment = torch.where(valid, rows, N).flatten()  # (N*L,)
        return self.pool([t.flatten(0, 1) for t in layer_tokens], segment, N)

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

    def patch_layout(self, patch_lengths: torch.Tensor, packed: Optional[bool] = None) -> PatchLayout:
        """build_patch_layout for this model's config."""
        return build_patch_layout(patch_lengths, self.config, packed)

    # ---- teacher forcing ---------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        cond_idx: torch.Tensor,
        patch_lengths: Union[torch.Tensor, PatchLayout],
        targets: Optional[torch.Tensor] = None,
        loss_config: LossConfig = LossConfig(),
    ):
        """idx (B, T-1) inputs x_0..x_{T-2}; cond_idx (B,); patch_lengths (B, M) zero-padded
        lengths over the T targets, or their PatchLayout (build_patch_layout, in the data
        workers: then the pass reads nothing on the host and compiles as one graph). Returns
        teacher_forced_output of the final-norm states (B, T, dim): (logits (B, T, V) float32,
        None), or with targets (B, T) (None, the mean loss under loss_config)."""
        layout = patch_lengths
        if not isinstance(layout, PatchLayout):  # built on the host, where the lengths are read
            layout = self.patch_layout(patch_lengths.cpu()).to(idx.device)
        B, T, dim = idx.shape[0], idx.shape[1] + 1, self.config.dim

        # encoder over x_0..x_{T-2}
        h = self.encoder_dropout(self.tok_embeddings(idx))  # (B, T-1, dim)
        enc_freqs = self.freqs_cis[None, 1:T]
        layer_states = []
        for layer in self.encoder_layers if T > 1 else []:
            h = layer(h, enc_freqs)
            layer_states.append(h.reshape(B * (T - 1), dim))

        # pooling straight into the patch transformer's slots [C, p_0, ..., p_{M-2}]
        R, S = layout.slot_geometry.shape[:2]
        n = layout.n_slots
        if layer_states:
            x = self.pool(layer_states, layout.token_slot.flatten(), n)  # (n, dim)
        else:
            x = h.new_zeros(n, dim)
        x = x.index_copy(0, layout.class_slot, self.cls_embedding(cond_idx)[:, 0].to(x.dtype))
        x = self.tok_dropout(x.view(R, S, dim))  # (R, S, dim)
        patch_freqs = self.patch_rope(*layout.slot_geometry.unbind(-1))  # (R, S, hd/2, 2), shared by every layer
        documents = layout.documents.prepare() if layout.documents is not None else None
        for layer in self.patch_layers:
            x = layer(x, patch_freqs, documents)
        g = x.reshape(n, dim)

        # decoder over [start, h_0, ..., h_{T-2}]
        u = torch.cat([self.decoder_start.expand(B, 1, -1).to(h.dtype), h], dim=1)  # (B, T, dim)
        dec_freqs = self.freqs_cis[None, :T]
        slots = layout.decoder_slot.flatten()  # (B*T,)
        for inject, layer in zip(self.patch_injections, self.decoder_layers):
            u = u + inject(g).index_select(0, slots).view(B, T, dim)
            u = layer(u, dec_freqs)
        return teacher_forced_output(self.norm(u), self.output, targets, loss_config)

    # ---- incremental generation (see generate.generate_dpar) ---------------------------
    # Every step is static-shape: caches are written at explicit per-row positions and read over
    # `length` slots (a host-side bound from a small fixed set), masked per row; what a step keeps
    # for later steps lives in buffers allocated by setup_caches (fixed addresses for CUDA graphs).
    def setup_caches(self, max_batch_size: int, dtype: Optional[torch.dtype] = None, images: Optional[int] = None):
        """Caches for max_batch_size rows (2 x images with guidance) of `images` images (default:
        one per row): encoder caches and encoder states per image, patch-transformer and decoder
        caches and the decoder injections per row."""
        dtype = dtype or self.tok_embeddings.weight.dtype
        device, T = self.tok_embeddings.weight.device, self.config.block_size
        images = images or max_batch_size
        setup_kv_caches(self.encoder_layers, images, T, dtype, device)
        setup_kv_caches(self.patch_layers, max_batch_size, T, dtype, device)
        setup_kv_caches(self.decoder_layers, max_batch_size, T, dtype, device)
        shapes = DecodeBuffers.shapes(self.config, max_batch_size, images)
        old = self.decode_buffers
        if old is None or old.shape_key() != (shapes, dtype, torch.device(device)):
            self.decode_buffers = DecodeBuffers(shapes, dtype, device)

    def remove_caches(self) -> None:
        for layers in (self.encoder_layers, self.patch_layers, self.decoder_layers):
            remove_kv_caches(layers)
        self.decode_buffers = None

    def start_patches(self, cond_idx: torch.Tensor, length: int) -> None:
        """Slot 0 (the class embedding) of every row (R,); sets the rows' injections."""
        zeros = torch.zeros(cond_idx.shape[0], dtype=torch.long, device=cond_idx.device)
        g = self.patch_step(self.cls_embedding(cond_idx)[:, 0], zeros, (zeros,) * 3, length)
        self.decode_buffers.injections.copy_(self.injections(g))

    def encode_step(self, tokens: torch.Tensor, input_pos: torch.Tensor, length: int) -> torch.Tensor:
        """tokens (n,) of images 0..n-1 at encoder slots input_pos (n, 1). Stores the states after
        every layer for pooling and returns the last layer's (n, dim), the decoder's next input."""
        h = self.tok_embeddings(tokens[:, None])  # (n, 1, dim)
        freqs = self.freqs_cis[input_pos + 1]  # (n, 1, head_dim/2, 2): slot j holds x_j
        states = []
        for layer in self.encoder_layers:
            h = layer.decode(h, freqs, input_pos, length=length)
            states.append(h[:, 0])
        images = torch.arange(tokens.shape[0], device=tokens.device)
        self.decode_buffers.states[images, :, input_pos[:, 0]] = torch.stack(states, dim=1)  # (n, E, dim)
        return h[:, 0]

    def patch_step(self, x: torch.Tensor, slot: torch.Tensor, geometry, length: Optional[int] = None,
                   reads: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Advance the patch transformer by one slot for cache rows 0..n-1, or for cache rows `rows`
        (n,) (distinct), each at its own slot (n,). x (n, dim) is the class embedding (slot 0) or
        the finished patch vector; geometry = (row, col_start, col_end) (n,) of that patch.
        length: host-side bound above the slot of every row that reads: attention covers at most
        that prefix of the caches, each row its own slots 0..slot. reads (n,) bool: the rows whose
        result is used (None: all); the others may read no cache slot (see cached_attend).
        Returns g (n, dim)."""
        slot = slot[:, None]  # (n, 1)
        freqs = self.patch_rope(slot, *(t[:, None] for t in geometry))
        h = x[:, None]
        for layer in self.patch_layers:
            h = layer.decode(h, freqs, slot, length, reads, rows)
        return h[:, 0]

    def close_patches(self, opens: torch.Tensor, start: torch.Tensor, slot: torch.Tensor, step: torch.Tensor,
                      max_length: int, length: int, group: int) -> None:
        """One patch step whose cost follows the images that open a patch (opens (B,)): the first
        `group` images in the order (opening images first, by index) run it, `group` >= the number
        of opening images, a host-side size from a small set (patch_group). They pool their
        finished patch [start, step-1] from the stored encoder states (gathering max_length states
        per patch, a bound on every patch's length, not the prefix) and advance the patch
        transformer at `slot` (B,), their next slot, in both guidance copies, each cache row
        reading its own patch cache up to that slot where it lies (cached_attend_rows); only the
        opening rows' injections change. The group's other images (padding up to `group`) run on
        their unfinished patch and read nothing: their cache write lands in their next slot, which
        no read reaches before their own next patch step rewrites it, and their results are
        dropped. Images outside the group are not touched. `length`: a bound above the opening
        rows' slots. step (1,) is a tensor, so that a captured graph serves every step."""
        W, B = self.config.grid_size, start.shape[0]
        states, injections = self.decode_buffers.states, self.decode_buffers.injections  # (B, E, T, dim), (R, D, dim)
        copies = injections.shape[0] // B
        images = torch.argsort((~opens).to(torch.int8), stable=True)[:group]  # (g,) opening images first
        opening = opens[images]  # (g,)
        first = start[images]  # (g,)
        index = first[:, None] + torch.arange(max_length, device=start.device)  # (g, L)
        valid = index < step  # the patch's tokens first..step-1
        index = index.clamp(max=states.shape[2] - 1)
        layer_tokens = [states[images[:, None], l, index] for l in range(states.shape[1])]  # E x (g, L, dim)
        p = self.pool_patches(layer_tokens, valid)  # (g, dim)
        geometry = (first // W, first % W, ((step - 1) % W).expand_as(first))
        geometry = tuple(t.repeat(copies) for t in geometry)
        rows = torch.cat([images + c * B for c in range(copies)])  # (g * copies,) cache rows of the group
        advance = opening.repeat(copies)  # (g * copies,)
        g = self.patch_step(p.repeat(copies, 1), slot[images].repeat(copies), geometry, length, advance, rows)
        kept = injections.index_select(0, rows)  # (g * copies, D, dim)
        injections.index_copy_(0, rows, torch.where(advance[:, None, None], self.injections(g), kept))

    def injections(self, g: torch.Tensor) -> torch.Tensor:
        """g (n, dim) -> what each decoder layer adds for tokens of that patch (n, D, dim)."""
        return torch.stack([inject(g) for inject in self.patch_injections], dim=1)

    def decode_step(self, u: torch.Tensor, input_pos: torch.Tensor, length: int) -> torch.Tensor:
        """u (n, dim) decoder inputs of rows 0..n-1 at slots input_pos (n, 1), conditioned on the
        rows' stored injections -> logits (n, V)."""
        injections = self.decode_buffers.injections[: u.shape[0]]  # (n, D, dim)
        freqs = self.freqs_cis[input_pos]
        h = u[:, None]
        for l, layer in enumerate(self.decoder_layers):
            h = layer.decode(h + injections[:, l, None], freqs, input_pos, length=length)
        return self.output(self.norm(h[:, 0])).float()


class DecodeBuffers(nn.Module):
    """What incremental DPAR decoding keeps besides the KV caches, written inside the steps:
    states      (B, E, T, dim) encoder states h^l of every token so far (pooled when a patch closes)
    injections  (R, D, dim) decoder injections of each row's current patch"""

    def __init__(self, shapes, dtype, device):
        super().__init__()
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @staticmethod
    def shapes(config: DPARConfig, rows: int, images: int) -> dict:
        T, dim = config.block_size, config.dim
        return {"states": (images, config.n_encoder_layer, T, dim), "injections": (rows, config.n_decoder_layer, dim)}

    def shape_key(self):
        shapes = {name: tuple(b.shape) for name, b in self.named_buffers()}
        return shapes, self.states.dtype, self.states.device


# name -> the DPARConfig fields of that size: same total depth as the GPT of the same size
DPAR_configs = {
    "DPAR-T": dict(n_encoder_layer=1, n_patch_layer=1, n_decoder_layer=1, n_head=4, dim=64),  # tests
    "DPAR-XS": dict(n_encoder_layer=1, n_patch_layer=2, n_decoder_layer=1, n_head=6, dim=192),  # CPU runs
    "DPAR-XS8": dict(n_encoder_layer=1, n_patch_layer=5, n_decoder_layer=2, n_head=6, dim=192),  # CPU, DPAR-B-like
    "DPAR-S": dict(n_encoder_layer=1, n_patch_layer=5, n_decoder_layer=2, n_head=6, dim=384),
    "DPAR-B": dict(n_encoder_layer=1, n_patch_layer=8, n_decoder_layer=3, n_head=12, dim=768),
    "DPAR-L": dict(n_encoder_layer=1, n_patch_layer=19, n_decoder_layer=4, n_head=16, dim=1024),
    "DPAR-XL": dict(n_encoder_layer=1, n_patch_layer=30, n_decoder_layer=5, n_head=20, dim=1280),
    "DPAR-XXL": dict(n_encoder_layer=1, n_patch_layer=41, n_decoder_layer=6, n_head=24, dim=1536),
}


def _build(name: str, **kwargs) -> DPAR:
    return DPAR(DPARConfig(**{**DPAR_configs[name], **kwargs}))


DPAR_models = {name: partial(_build, name) for name in DPAR_configs}  # LlamaGen's call form, like GPT_models
