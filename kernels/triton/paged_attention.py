"""Triton paged tree attention (see kernels/paged_attention.py for the mask and the reference).

One program per (sequence, KV head, block of query rows, key split). The query rows of a
program are all G = H / Hkv query heads of its KV head times the T new tokens, stacked
[G * T, D], so each K/V block is read once per KV head rather than once per query head
(grouped-query attention). Keys are walked through the block table BLOCK_N slots at a time
with an online softmax (FlashAttention, arXiv 2205.14135). Long prefixes at small batch are
split over programs along the keys (flash-decoding): each split writes its normalised partial
output and log-sum-exp, and the splits are merged afterwards.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.paged_attention import PagedLayout


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in fp32; IEEE: full fp32 products (fp32 inputs), not TF32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _paged_attention_kernel(
    Q, K, V, TABLE, PREFIX, TSTART, TBITS, KLEN, OUT, LSE,
    s_qb, s_qh, s_qt,
    s_kb, s_kh, s_ks,
    s_vb, s_vh, s_vs,
    s_tab, s_pre,
    s_ob, s_oh, s_ot, s_os,  # O [B, H, T, S, D]; LSE is [B, H, T, S] contiguous
    n_kv_heads, T, D, G, sm_scale, keys_per_split,
    BS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    pid_bh, pid_r, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = pid_bh // n_kv_heads
    kvh = pid_bh % n_kv_heads
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] = (group head, token) pairs
    row_ok = rows < G * T
    t = rows % T
    h = kvh * G + rows // T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    q = tl.load(
        Q + b * s_qb + h[:, None] * s_qh + t[:, None] * s_qt + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [R, D]
    if DOT_FP32:  # the interpreter's bf16 dot is wrong; bf16 operands are exact in fp32
        q = q.to(tl.float32)
    prefix = tl.load(PREFIX + b * s_pre + t, mask=row_ok, other=0)  # [R]
    bits = tl.load(TBITS + b * s_pre + t, mask=row_ok, other=0)  # [R] int64
    tree_start = tl.load(TSTART + b)
    key_hi = tl.minimum(tl.load(KLEN + b), (split + 1) * keys_per_split)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for start in range(split * keys_per_split, key_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)  # [N] key slots
        n_ok = n < key_hi
        blk = tl.load(TABLE + b * s_tab + n // BS, mask=n_ok, other=0).to(tl.int64)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(
            K + blk[:, None] * s_kb + kvh * s_kh + (n % BS)[:, None] * s_ks + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if DOT_FP32:
            k = k.to(tl.float32)
        s = _dot(q, tl.trans(k), IEEE) * sm_scale  # [R, N] fp32
        rel = n - tree_start
        in_tree = (rel >= 0) & (rel < 64)
        bit = (bits[:, None] >> tl.where(in_tree, rel, 0).to(tl.int64)[None, :]) & 1
        visible = (n[None, :] < prefix[:, None]) | (in_tree[None, :] & (bit != 0))
        s = tl.where(visible & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + blk[:, None] * s_vb + kvh * s_vh + (n % BS)[:, None] * s_vs + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        p = p.to(v.dtype)  # probabilities rounded to the KV dtype, as tensor cores take them
        if DOT_FP32:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + _dot(p, v, IEEE)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    o_off = b * s_ob + h * s_oh + t * s_ot + split * s_os  # [R]
    tl.store(OUT + o_off[:, None] + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + ((b * n_kv_heads * G + h) * T + t) * tl.num_programs(2) + split, lse, mask=row_ok)


def _splits(programs: int, max_key_len: int, block_n: int, device: torch.device) -> int:
    """Key splits so the grid covers the GPU about twice (one split on the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-2 * sms // programs), -(-max_key_len // block_n)))


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: PagedLayout,
    splits: int | None = None,
) -> torch.Tensor:
    """q [B, H, T, D]; k_cache, v_cache [num_blocks, Hkv, block_size, D] -> [B, H, T, D] in q.dtype.

    splits: key splits (default: enough programs to fill the GPU)."""
    B, H, T, D = q.shape
    _, n_kv, bs, _ = k_cache.shape
    G = H // n_kv
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head dimension must be contiguous")
    block_d = max(16, triton.next_power_of_2(D))
    block_r = max(16, min(64, triton.next_power_of_2(G * T)))
    block_n = max(16, min(64, triton.next_power_of_2(layout.max_key_len)))
    row_blocks = triton.cdiv(G * T, block_r)
    if splits is None:
        splits = _splits(B * n_kv * row_blocks, layout.max_key_len, block_n, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(layout.max_key_len, splits), block_n) * block_n
    out = torch.empty(B, H, T, splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, T, splits, dtype=torch.float32, device=q.device)
    table = layout.table.to(torch.int32).contiguous()
    prefix = layout.prefix.to(torch.int32).contiguous()
    bits = layout.tree_bits.to(torch.int64).contiguous()
    _paged_attention_kernel[(B * n_kv, row_blocks, splits)](
        q, k_cache, v_cache, table, prefix, layout.tree_start.to(torch.int32).contiguous(), bits,
        layout.key_len.to(torch.int32).contiguous(), out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        table.stride(0), prefix.stride(0),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        n_kv, T, D, G, 1.0 / math.sqrt(D), keys_per_split,
        BS=bs, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d,
        IEEE=q.dtype == torch.float32, DOT_FP32=q.dtype == torch.bfloat16 and q.device.type != "cuda",
    )  # fmt: skip
    if splits == 1:
        return out[:, :, :, 0].to(q.dtype)
    total = torch.logsumexp(lse, dim=-1, keepdim=True)  # [B, H, T, 1]
    weight = torch.nan_to_num(torch.exp(lse - total))  # splits that saw no key weigh 0
    return (weight[..., None] * out).sum(-2).to(q.dtype)
