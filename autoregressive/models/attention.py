"""Attention kernels behind one small interface used by every transformer block.

`attend(q, k, v, mask=None, dropout_p=0.0, documents=None)` takes q (B, H, S, D) and k/v
(B, H, S_kv, D) and returns (B, H, S, D):
  - no mask, no documents: causal over aligned positions (teacher forcing);
  - a boolean mask (True = may attend): whatever the mask says (KV-cached decoding; always SDPA);
  - documents (a `Documents`): B = 1 and the S positions are a packed sequence of independent
    causal documents (DPAR's patch transformer over all images' patches): position i attends
    to the positions j <= i of its own document only. Slots past the last real document
    (padding up to a bucket) get finite but unspecified outputs.

Backends:
  sdpa    F.scaled_dot_product_attention, the portable fallback. Packed documents are gathered
          into a (documents, longest) grid, run causally and gathered back: no padding slot
          enters a linear layer and no (S, S) mask is built.
  flex    torch.nn.attention.flex_attention (compiled kernel) with a causal block mask cached
          per shape, or a document-causal block mask built once per batch from the document
          offsets. CPU and CUDA (this torch's flex attention has no backward on CPU).
  varlen  packed variable-length flash attention on CUDA: torch.nn.attention.varlen where the
          installed torch has it, else the flash-attn package. Dense causal attention uses
          SDPA (whose CUDA kernel is the same flash attention).
The backend is chosen per device: CUDA with a varlen kernel -> varlen, else CUDA with flex ->
flex, else sdpa. DPAR_ATTENTION=sdpa|flex|varlen (read on first use) or
set_attention_backend(name) overrides the choice. A backend that cannot run a call (dropout
in flex/varlen, float32 in varlen) hands that call to SDPA; the result is the same attention.

`cached_attend` is the attention of KV-cached decoding: one query per cache row, each row reading
its own cache prefix (per-row lengths held on the device; a row may read nothing). Its backend is
chosen apart from attend()'s (set_decode_attention, DPAR_DECODE_ATTENTION):
  sdpa    SDPA with a per-row mask over the whole (rows, L) read: the reference, and the CPU default
          (its cost follows rows x L, whatever the per-row lengths);
  flex    flex attention (compiled kernel) with a block mask built on the device from the per-row
          lengths: a row reads ceil(length / DECODE_BLOCK) blocks of its cache and a row of length 0
          reads none, so the cost follows what the rows need. The CUDA default where flex exists.

`segment_attend` is the one-query-per-segment attention of DPAR's patch pooling.
"""
import functools
import inspect
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flex", "varlen")
ENV_VAR = "DPAR_ATTENTION"
FLEX_BLOCK = 128
DECODE_BACKENDS = ("sdpa", "flex")
DECODE_ENV_VAR = "DPAR_DECODE_ATTENTION"
DECODE_BLOCK = 32  # cache slots per block of a decode block mask (a multiple of Decoding.read_block's default)

_override: Optional[str] = None
_chosen: Dict[str, str] = {}  # device type -> backend, filled on first use
_decode_override: Optional[str] = None
_decode_chosen: Dict[str, str] = {}


# --------------------------------------------------------------------------------------
# Feature checks (every API newer than torch 2.6 is optional)
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _flex_module():
    try:
        from torch.nn.attention import flex_attention
    except ImportError:
        return None
    return flex_attention if hasattr(flex_attention.BlockMask, "from_kv_blocks") else None


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable:
    """flex_attention compiled once (recompiled, dynamic, for a second sequence length);
    inlined when the caller is itself being compiled."""
    return torch.compile(_flex_module().flex_attention)


DECODE_FLEX_SHAPES = 64  # compiled decode flex kernels kept (Dynamo keeps 8 per function by default)


@functools.lru_cache(maxsize=None)
def _compiled_decode_flex() -> Callable:
    """flex_attention compiled once per decode shape (static: this torch's CPU flex template
    fails to build with symbolic sizes). A generation's step functions read in a few dozen shapes
    (read lengths x row counts, patch group sizes), more than Dynamo's default of 8 compiled
    variants per function, past which it would run flex's dense eager fallback: the limit is
    raised for these calls. Inside a compiled step, flex is traced into the step's graph."""
    compiled = torch.compile(_flex_module().flex_attention, dynamic=False)

    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return _flex_module().flex_attention(*args, **kwargs)
        from torch._dynamo import config

        with config.patch(recompile_limit=DECODE_FLEX_SHAPES):
            return compiled(*args, **kwargs)

    return run


@functools.lru_cache(maxsize=None)
def _varlen_kernel() -> Optional[Tuple[str, Callable, dict]]:
    """(source, function, causal keyword arguments) of a packed varlen flash kernel, or None.
    torch's varlen_attn took is_causal=True up to 2.10 and window_size=(-1, 0) from 2.11."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if varlen_attn is not None:
        params = inspect.signature(varlen_attn).parameters
        if "is_causal" in params:
            return "torch", varlen_attn, {"is_causal": True}
        if "window_size" in params:
            return "torch", varlen_attn, {"window_size": (-1, 0)}
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return "flash_attn", flash_attn_varlen_func, {"causal": True}


def available_backends(device: torch.device | str) -> Tuple[str, ...]:
    """Backends that can run on `device` with this torch (flex on CPU: forward only)."""
    device = torch.device(device)
    out = ["sdpa"]
    if _flex_module() is not None:
        out.append("flex")
    if device.type == "cuda" and _varlen_kernel() is not None:
        out.append("varlen")
    return tuple(out)


def set_attention_backend(name: Optional[str]) -> None:
    """Force one backend for every device ("sdpa", "flex", "varlen"); None restores the
    automatic choice (and re-reads DPAR_ATTENTION)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    _override = name
    _chosen.clear()


def attention_backend(device: torch.device | str = "cpu") -> str:
    """The backend attend() uses on `device`."""
    return _backend_for(torch.device(device).type)


def _constant_result(fn: Callable) -> Callable:
    """What torch.compiler.assume_constant_result does (mark the function for Dynamo), without
    importing Dynamo when this module is imported (that import costs seconds per process)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def _backend_for(device_type: str) -> str:
    """Resolved once per device type; compiled code takes the answer as a constant."""
    device = torch.device(device_type)
    if _override is not None:
        return _override
    if device.type not in _chosen:
        requested = os.environ.get(ENV_VAR, "").strip().lower()
        if requested and requested not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {requested!r}")
        if requested:
            _chosen[device.type] = requested
        elif device.type == "cuda":
            available = available_backends(device)
            _chosen[device.type] = "varlen" if "varlen" in available else "flex" if "flex" in available else "sdpa"
        else:
            _chosen[device.type] = "sdpa"
    return _chosen[device.type]


# --------------------------------------------------------------------------------------
# Packed documents
# --------------------------------------------------------------------------------------
@dataclass
class Documents:
    """N packed slots split into contiguous causal documents; the slots after the last real
    document (padding of the packed length) form one extra document of their own.

    cu_seqlens  (n + 1,) int32 offsets: document d holds slots cu_seqlens[d]..cu_seqlens[d+1]-1
    max_seqlen  bound on a document's length for the varlen kernels (kept static, so compiled
                code does not specialise on each batch's longest document)
    doc_ids     (N,) int64 document of every slot
    grid_index  (n_real, L) slot at (real document, position) for the SDPA path, L >= the
                longest real document (bucketed, see build_documents); positions past a
                document's end repeat its last slot
    slot_index  (N,) int64 flat grid position (document * L + position) of every slot
                (padding slots: 0)
    block_mask  flex attention's document-causal BlockMask, built by prepare()
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    doc_ids: torch.Tensor
    grid_index: torch.Tensor
    slot_index: torch.Tensor
    block_mask: Any = None

    @property
    def num_slots(self) -> int:
        return self.doc_ids.shape[0]

    @property
    def num_docs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Documents":
        names = [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]
        return replace(self, **{name: fn(getattr(self, name)) for name in names})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Documents":
        mask = self.block_mask.to(device) if self.block_mask is not None else None
        return replace(self._map(lambda t: t.to(device, non_blocking=non_blocking)), block_mask=mask)

    def pin_memory(self) -> "Documents":
        """Page-locked copies (DataLoader(pin_memory=True) calls this), for non_blocking .to()."""
        return self._map(lambda t: t.pin_memory())

    def prepare(self) -> "Documents":
        """Build what the current backend needs on these tensors' device (flex: the block
        mask). Call outside compiled code, once per batch."""
        if self.block_mask is None and _backend_for(self.doc_ids.device.type) == "flex":
            return replace(self, block_mask=document_block_mask(self.doc_ids))
        return self


def build_documents(
    lengths: torch.Tensor, total: Optional[int] = None, max_seqlen: Optional[int] = None, grid_multiple: int = 1
) -> Documents:
    """Documents of the given lengths (n,) (each >= 1) packed from slot 0, followed by
    `total - sum(lengths)` padding slots (default none). max_seqlen defaults to the longest
    document. The SDPA grid's length is the longest document rounded up to grid_multiple (capped
    at max_seqlen when that is larger than the longest), so compiled code sees few grid shapes.
    Reads the lengths on the host: build it where they live (e.g. a data worker)."""
    if lengths.ndim != 1 or lengths.numel() == 0 or bool((lengths < 1).any()):
        raise ValueError(f"document lengths must be a non-empty (n,) tensor of values >= 1, got {lengths.tolist()}")
    lengths = lengths.long()
    device, n = lengths.device, lengths.shape[0]
    real = int(lengths.sum())
    total = real if total is None else total
    if total < real:
        raise ValueError(f"{total} packed slots cannot hold documents of {real} slots")
    longest = int(lengths.max())
    bound = longest if max_seqlen is None else max_seqlen
    grid = max(longest, min(-(-longest // grid_multiple) * grid_multiple, bound))
    if total > real:
        lengths = torch.cat([lengths, lengths.new_tensor([total - real])])
    cu = F.pad(lengths.cumsum(0), (1, 0))  # (docs + 1,)
    doc_ids = torch.repeat_interleave(torch.arange(lengths.shape[0], device=device), lengths)  # (N,)
    position = torch.arange(total, device=device) - cu[doc_ids]  # (N,)
    offset = torch.arange(grid, device=device)
    grid_index = cu[:n, None] + torch.minimum(offset, lengths[:n, None] - 1)  # (n, L)
    slot_index = torch.where(doc_ids < n, doc_ids * grid + position, 0)  # (N,)
    return Documents(
        cu_seqlens=cu.to(torch.int32),
        max_seqlen=bound,
        doc_ids=doc_ids,
        grid_index=grid_index,
        slot_index=slot_index,
    )


def document_block_mask(doc_ids: torch.Tensor, block: int = FLEX_BLOCK):
    """Flex attention BlockMask for document-causal attention over N slots whose document
    ids (N,) are non-decreasing. Built from per-block document ranges in O((N/block)^2),
    never materialising the (N, N) mask."""
    flex = _flex_module()
    N = doc_ids.shape[0]
    nb = -(-N // block)
    first = doc_ids[torch.arange(nb, device=doc_ids.device) * block]  # (nb,) lowest document in a block
    last = doc_ids[torch.clamp(torch.arange(1, nb + 1, device=doc_ids.device) * block, max=N) - 1]
    i = torch.arange(nb, device=doc_ids.device)
    below = i[None, :] <= i[:, None]  # (q block, kv block) causal at block level
    touches = below & (first[None, :] <= last[:, None]) & (last[None, :] >= first[:, None])
    single = first == last  # the block lies inside one document
    full = (i[None, :] < i[:, None]) & single[:, None] & single[None, :] & (first[:, None] == first[None, :])
    partial = touches & ~full

    def as_blocks(selected: torch.Tensor):
        count = selected.sum(-1).to(torch.int32)[None, None]  # (1, 1, nb)
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None]
        return count, order  # selected kv blocks first, in increasing order

    doc = doc_ids.to(torch.int32)  # int64 captured tensors break this torch's CPU flex kernel

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    kv_num, kv_idx = as_blocks(partial)
    full_num, full_idx = as_blocks(full)
    return flex.BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                         seq_lengths=(N, N))


@functools.lru_cache(maxsize=32)
def _causal_block_mask(length: int, device: str):
    """Causal BlockMask per (sequence length, device), cached across calls."""
    flex = _flex_module()
    return flex.create_block_mask(lambda b, h, q, kv: kv <= q, None, None, length, length, device=device)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
def _sdpa_documents(q, k, v, documents: Documents, dropout_p: float) -> torch.Tensor:
    """Gather the packed slots into a (documents, longest) grid, run causally, gather back.
    Real positions only see earlier positions of their row, which are all real."""
    n, L = documents.grid_index.shape
    H, D = q.shape[1], q.shape[3]
    grid = [t[0].index_select(1, documents.grid_index.flatten()).view(H, n, L, D).transpose(0, 1) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*grid, is_causal=True, dropout_p=dropout_p)  # (n, H, L, D)
    out = out.transpose(0, 1).reshape(H, n * L, D).index_select(1, documents.slot_index)  # (H, N, D)
    return out[None]


def _flex_attend(q, k, v, documents: Optional[Documents]) -> torch.Tensor:
    if documents is None:
        block_mask = _causal_block_mask(q.shape[2], str(q.device))
    else:
        block_mask = documents.block_mask
        if block_mask is None:
            block_mask = document_block_mask(documents.doc_ids)
    return _compiled_flex()(q, k, v, block_mask=block_mask)


def _varlen_attend(q, k, v, documents: Documents, dropout_p: float) -> torch.Tensor:
    source, kernel, causal = _varlen_kernel()
    packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]  # (N, H, D)
    cu, bound = documents.cu_seqlens, documents.max_seqlen
    if source == "torch":
        out = kernel(*packed, cu, cu, bound, bound, **causal)
    else:
        out = kernel(*packed, cu, cu, bound, bound, dropout_p=dropout_p, **causal)
    return out.transpose(0, 1)[None]  # (1, H, N, D)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    documents: Optional[Documents] = None,
) -> torch.Tensor:
    """Causal, masked or document-causal attention (see the module docstring).
    q (B, H, S, D), k/v (B, H, S_kv, D) -> (B, H, S, D)."""
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if documents is not None and q.shape[0] != 1:
        raise ValueError(f"packed documents need a batch of one packed row, got {q.shape[0]} rows")
    backend = _backend_for(q.device.type)
    if backend == "flex" and dropout_p == 0.0:
        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            raise ValueError(f"flex attention has no backward on CPU; train on CPU with {ENV_VAR}=sdpa")
        return _flex_attend(q, k, v, documents)
    if documents is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if backend == "varlen":
        if q.device.type != "cuda":
            raise ValueError(f"varlen attention runs on CUDA only, not {q.device.type}; set {ENV_VAR}=sdpa or flex")
        source = _varlen_kernel()[0]
        if q.dtype in (torch.float16, torch.bfloat16) and (dropout_p == 0.0 or source == "flash_attn"):
            return _varlen_attend(q, k, v, documents, dropout_p)
    return _sdpa_documents(q, k, v, documents, dropout_p)


# --------------------------------------------------------------------------------------
# KV-cached decoding
# --------------------------------------------------------------------------------------
def set_decode_attention(name: Optional[str]) -> None:
    """Force the decode attention backend ("sdpa", "flex") on every device; None restores the
    automatic choice (and re-reads DPAR_DECODE_ATTENTION)."""
    global _decode_override
    if name is not None and name not in DECODE_BACKENDS:
        raise ValueError(f"decode attention backend must be one of {DECODE_BACKENDS}, got {name!r}")
    _decode_override = name
    _decode_chosen.clear()


def decode_attention_backend(device: torch.device | str = "cpu") -> str:
    """The backend cached_attend() uses on `device`."""
    return _decode_backend_for(torch.device(device).type)


@_constant_result
def _decode_backend_for(device_type: str) -> str:
    if _decode_override is not None:
        return _decode_override
    if device_type not in _decode_chosen:
        requested = os.environ.get(DECODE_ENV_VAR, "").strip().lower()
        if requested and requested not in DECODE_BACKENDS:
            raise ValueError(f"{DECODE_ENV_VAR} must be one of {DECODE_BACKENDS}, got {requested!r}")
        flex = _flex_module() is not None and device_type == "cuda"
        _decode_chosen[device_type] = requested or ("flex" if flex else "sdpa")
    return _decode_chosen[device_type]


def decode_block_mask(limit: torch.Tensor, length: int, block: int = DECODE_BLOCK):
    """Flex BlockMask for one query per row: row r reads cache slots 0..limit[r]-1 of a read of
    `length` slots (limit (n,) int on the device, 0 = reads nothing). Built with tensor ops only
    (no host read), so a compiled step builds it inside its graph."""
    flex = _flex_module()
    n, blocks = limit.shape[0], -(-length // block)
    count = ((limit + block - 1) // block).clamp(max=blocks).to(torch.int32)  # (n,) blocks each row reads
    order = torch.arange(blocks, dtype=torch.int32, device=limit.device)
    limit = limit.to(torch.int32)  # int64 captured tensors break this torch's CPU flex kernel

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < limit[b]

    return flex.BlockMask.from_kv_blocks(count[:, None, None], order.expand(n, 1, 1, blocks), BLOCK_SIZE=(1, block),
                                         mask_mod=mask_mod, seq_lengths=(1, length), compute_q_blocks=False)


def cached_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
                  reads: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of queries at cache positions input_pos (n, S) to cache views k, v (n, H, L, D):
    query s of row r sees slots 0..input_pos[r, s]. q (n, H, S, D) -> (n, H, S, D).
    reads (n,) bool: rows whose output is used; under flex the others read no cache slot (their
    output is unspecified). One query per row (S = 1) runs on the decode backend; S > 1 (a
    prefill of several class slots) on SDPA with a mask."""
    n, L = k.shape[0], k.shape[2]
    if q.shape[2] == 1 and _decode_backend_for(q.device.type) == "flex":
        limit = input_pos[:, 0] + 1
        if reads is not None:
            limit = torch.where(reads, limit, 0)
        return _compiled_decode_flex()(q, k, v, block_mask=decode_block_mask(limit, L))
    slots = torch.arange(L, device=k.device)
    mask = slots[None, None, :] <= input_pos[:, :, None]  # (n, S, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])


def gathered_block_mask(offset: torch.Tensor, limit: torch.Tensor, n_slots: int, max_read: int,
                        block: int = DECODE_BLOCK):
    """Flex BlockMask for n queries over one flat sequence of n_slots cache slots (every cache row
    back to back): query j reads slots offset[j] .. offset[j] + limit[j] - 1 (its own row's
    prefix; limit 0 = nothing), limit <= max_read. offset, limit (n,) int on the device; tensor
    ops only (no host read)."""
    flex = _flex_module()
    n, total = offset.shape[0], -(-n_slots // block)
    width = min(-(-max_read // block) + 1, total)  # blocks a read of max_read slots can touch at any offset
    first = offset // block
    last = (offset + limit + block - 1) // block
    count = torch.where(limit > 0, last - first, 0).to(torch.int32)  # (n,)
    order = (first[:, None] + torch.arange(width, device=offset.device)).clamp(max=total - 1).to(torch.int32)
    order = F.pad(order, (0, total - width))  # (n, total): flex's CPU kernel wants a column per kv block
    lo, hi = offset.to(torch.int32), (offset + limit).to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo[q_idx]) & (kv_idx < hi[q_idx])

    return flex.BlockMask.from_kv_blocks(count[None, None], order[None, None], BLOCK_SIZE=(1, block),
                                         mask_mod=mask_mod, seq_lengths=(n, n_slots), compute_q_blocks=False)


def cached_attend_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                       input_pos: torch.Tensor, length: int, reads: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of n queries, query j from cache row rows[j] at position input_pos[j] (n, 1), to
    that row's slots 0..input_pos[j] of the caches k_cache, v_cache (R, C, Hkv, D); length: a
    host-side bound above every position of a row that reads. q (n, H, 1, D) -> (n, H, 1, D).
    reads (n,) bool: the queries whose output is used (under flex the others read nothing).
    flex reads each row's slots where they lie (the caches as one flat sequence, no copy); SDPA
    gathers the rows' first `length` slots and masks."""
    n, H, D = q.shape[0], q.shape[1], q.shape[3]
    R, C, Hkv = k_cache.shape[:3]
    if _decode_backend_for(q.device.type) == "flex":
        limit = input_pos[:, 0] + 1
        if reads is not None:
            limit = torch.where(reads, limit, 0)
        k, v = (c.view(1, R * C, Hkv, D).transpose(1, 2) for c in (k_cache, v_cache))  # (1, Hkv, R*C, D) views
        mask = gathered_block_mask(rows * C, limit, R * C, length)
        out = _compiled_decode_flex()(q.transpose(0, 2), k, v, block_mask=mask, enable_gqa=H != Hkv)  # (1, H, n, D)
        return out.transpose(0, 2)
    k, v = (c[:, :length].index_select(0, rows).transpose(1, 2) for c in (k_cache, v_cache))  # (n, Hkv, L, D)
    if H != Hkv:
        k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    return cached_attend(q, k, v, input_pos)


def segment_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """One query per segment attends to its members' keys/values (scaled dot product,
    softmax over the members, in at least float32).
    q (n, H, D) one query per segment; k, v (K, H, D) member keys/values; segment (K,) int64
    in [0, n], where n marks keys that belong to no segment. Returns (n, H, D); a segment
    without members gets zeros."""
    n, H, D = q.shape
    q = F.pad(q, (0, 0, 0, 0, 0, 1))  # (n + 1, H, D): row n collects the unassigned keys
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.index_select(0, segment).to(dtype) * k.to(dtype)).sum(-1) * (1.0 / math.sqrt(D))  # (K, H)
    index = segment[:, None].expand_as(scores)
    # the softmax is shift invariant: the per-segment maximum needs no gradient
    peak = scores.new_full((n + 1, H), float("-inf")).scatter_reduce(0, index, scores.detach(), "amax")
    weights = torch.exp(scores - peak.index_select(0, segment))  # (K, H)
    total = scores.new_zeros(n + 1, H).index_add(0, segment, weights)
    weights = (weights / total.index_select(0, segment)).to(v.dtype)
    out = v.new_zeros(n + 1, H, D).index_add(0, segment, weights[..., None] * v)  # (n + 1, H, D)
    return out[:n]
