"""Attention over gathered KV: dispatch plus the pure-torch reference (the CPU path).

The model calls :func:`attention` and never knows which implementation runs; a fused kernel
(Triton on CUDA) plugs in here, tested against :func:`attention_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q [B, H, T, D]; k, v [B, Hkv, K, D] with H a multiple of Hkv (query head h reads KV head
    h // (H / Hkv)); mask [B, 1, T, K] bool, True = attend, or None = attend to all K keys.
    Returns [B, H, T, D]. torch picks its own CPU/CUDA SDPA backend underneath.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention as in attention_reference, through the fastest available implementation."""
    return attention_reference(q, k, v, mask)
