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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Attention as in attention_reference, through the fastest available implementation.

    compute_dtype (e.g. float64) computes in that dtype and returns q's. Why a model would ask:
    a decode step (one query, no mask) and a verification forward (several queries, a mask,
    tree nodes at other key slots) round fp32 attention differently, by an ulp or so. That is
    harmless while the rest of the forward stays fp32, but a model that rounds activations to
    bf16 before its next matmul (the q4_1 weights) turns a 1-ulp difference into a bf16 step
    now and then, and greedy choices then differ between target-only and speculative decoding.
    Computed in float64 and rounded to float32 once, both paths give the same bits except with
    negligible probability.
    """
    if compute_dtype is not None and compute_dtype != q.dtype:
        out = attention_reference(q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype), mask)
        return out.to(q.dtype)
    return attention_reference(q, k, v, mask)
