"""Triton H2O accumulation (rule and reference: kernels/h2o.py): one program per (sequence, KV
head, block of keys) sums its group's attention rows over the queries and adds them in place."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _h2o_accumulate_kernel(
    S, A, s_sb, s_sh, s_ab, s_ah, s_at, n_kv, G, T, K,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_bh, pid_k = tl.program_id(0), tl.program_id(1)
    b, kvh = pid_bh // n_kv, pid_bh % n_kv
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    total = tl.zeros([BLOCK_K], tl.float32)
    for r0 in range(0, G * T, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)  # rows = (query head of the group, query) pairs
        h, t = kvh * G + r // T, r % T
        w = tl.load(
            A + b * s_ab + h[:, None] * s_ah + t[:, None] * s_at + k[None, :],
            mask=(r < G * T)[:, None] & k_ok[None, :],
            other=0.0,
        )
        total += tl.sum(w.to(tl.float32), 0)
    ptr = S + b * s_sb + kvh * s_sh + k
    tl.store(ptr, tl.load(ptr, mask=k_ok, other=0.0) + total, mask=k_ok)


def h2o_accumulate_triton(scores: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """scores [B, Hkv, K] fp32 (last dim contiguous) += attn [B, H, T, K] summed per KV head."""
    B, H, T, K = attn.shape
    n_kv = scores.shape[1]
    if scores.dtype != torch.float32 or scores.stride(-1) != 1:
        raise ValueError("H2O scores must be float32 and contiguous over the keys")
    if attn.stride(-1) != 1:
        attn = attn.contiguous()
    block_k = min(128, max(16, triton.next_power_of_2(K)))
    _h2o_accumulate_kernel[(B * n_kv, triton.cdiv(K, block_k))](
        scores, attn, scores.stride(0), scores.stride(1), attn.stride(0), attn.stride(1), attn.stride(2),
        n_kv, H // n_kv, T, K, BLOCK_R=16, BLOCK_K=block_k,
    )  # fmt: skip
    return scores
