"""Triton fused chain speculative sampling (rule and reference: kernels/spec_sampling.py).

One program per sequence: the n acceptance tests are one vector op over the drafted tokens'
probabilities; then two passes over the vocabulary in BLOCK_V chunks rebuild the residual
max(0, p - q) of the first rejected row in registers, the first to sum it and the second to
find where its running sum crosses u * sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chain_accept_kernel(
    TOK, LEN, P, Q, UA, UE, ACC_OUT, TOK_OUT,
    s_tb, s_pb, s_pn, s_qb, s_qn, s_ub,
    N, V,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    length = tl.load(LEN + b).to(tl.int32)
    i = tl.arange(0, BLOCK_N)
    live = i < length
    x = tl.load(TOK + b * s_tb + i, mask=live, other=0).to(tl.int64)
    p_x = tl.load(P + b * s_pb + i * s_pn + x, mask=live, other=0.0).to(tl.float32)
    q_x = tl.load(Q + b * s_qb + i * s_qn + x, mask=live, other=0.0).to(tl.float32)
    u = tl.load(UA + b * s_ub + i, mask=live, other=1.0).to(tl.float32)
    ok = live & (q_x > 0) & (u * q_x < p_x)
    accepted = tl.min(tl.where(ok, length, i), 0)  # the first rejection, or length
    rejected = accepted < length
    p_row = P + b * s_pb + accepted.to(tl.int64) * s_pn
    q_row = Q + b * s_qb + tl.minimum(accepted, N - 1).to(tl.int64) * s_qn

    total_r = 0.0
    total_p = 0.0
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        m = v < V
        pv = tl.load(p_row + v, mask=m, other=0.0).to(tl.float32)
        qv = tl.load(q_row + v, mask=m, other=0.0).to(tl.float32) * rejected.to(tl.float32)
        total_r += tl.sum(tl.maximum(pv - qv, 0.0), 0)
        total_p += tl.sum(pv, 0)
    use_q = rejected & (total_r > 0)  # else the residual is empty: draw from p
    total = tl.where(use_q, total_r, total_p)
    target = tl.load(UE + b).to(tl.float32) * total

    carry = 0.0
    first = V
    last = -1
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        m = v < V
        pv = tl.load(p_row + v, mask=m, other=0.0).to(tl.float32)
        qv = tl.load(q_row + v, mask=m, other=0.0).to(tl.float32) * use_q.to(tl.float32)
        r = tl.where(m, tl.maximum(pv - qv, 0.0), 0.0)
        cum = tl.cumsum(r, 0) + carry
        first = tl.minimum(first, tl.min(tl.where((cum > target) & m, v, V), 0))
        last = tl.maximum(last, tl.max(tl.where((r > 0) & m, v, -1), 0))
        carry += tl.sum(r, 0)
    tl.store(ACC_OUT + b, accepted.to(tl.int64))
    tl.store(TOK_OUT + b, tl.where(first < V, first, last).to(tl.int64))


def chain_accept_triton(
    draft_tokens: torch.Tensor,
    lengths: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    u_accept: torch.Tensor,
    u_emit: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes as kernels.spec_sampling.chain_accept_reference."""
    B, N = draft_tokens.shape
    V = target_probs.shape[-1]
    if N == 0:  # no drafted token anywhere: a plain draw from p_0
        draft_tokens = torch.zeros(B, 1, dtype=torch.long, device=target_probs.device)
        draft_probs = torch.zeros(B, 1, V, dtype=target_probs.dtype, device=target_probs.device)
        u_accept = torch.ones(B, 1, device=target_probs.device)
        N = 1
    if target_probs.stride(-1) != 1 or draft_probs.stride(-1) != 1:
        raise ValueError("probabilities must be contiguous over the vocabulary")
    tokens, u_accept = draft_tokens.contiguous(), u_accept.float().contiguous()
    accepted = torch.empty(B, dtype=torch.long, device=target_probs.device)
    next_token = torch.empty_like(accepted)
    _chain_accept_kernel[(B,)](
        tokens, lengths.contiguous(), target_probs, draft_probs, u_accept, u_emit.float().contiguous(),
        accepted, next_token,
        tokens.stride(0), target_probs.stride(0), target_probs.stride(1),
        draft_probs.stride(0), draft_probs.stride(1), u_accept.stride(0),
        N, V,
        BLOCK_N=max(16, triton.next_power_of_2(N)), BLOCK_V=min(4096, triton.next_power_of_2(V)),
    )  # fmt: skip
    return accepted, next_token
