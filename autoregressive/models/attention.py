"""Attention kernels behind one small interface used by every transformer block.

`attend(q, k, v, ...)` takes q (B, H, S, D), k/v (B, H, S_kv, D) and returns (B, H, S, D).
Without a mask the attention is causal over aligned positions (training); with a boolean
mask (True = may attend) it is whatever the mask says (KV-cached decoding).
"""
from typing import Optional

import torch
import torch.nn.functional as F


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
