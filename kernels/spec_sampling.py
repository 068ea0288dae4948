"""Fused chain speculative sampling: acceptance, first rejection and the residual draw in one op.

The rule is services.core.spec's CHAIN rule (Leviathan et al., arXiv 2211.17192; Chen et al.,
arXiv 2302.01318) for a batch of sequences at once: drafted token x_i (drawn from q_i) is
accepted iff u_i < min(1, p_i(x_i) / q_i(x_i)), written u_i * q_i(x_i) < p_i(x_i) so that no
division rounds differently on different hardware; at the first rejection i the emitted token
comes from the residual norm(max(0, p_i - q_i)) (or from p_i where that is all zero, as
spec.verify does); when all n drafted tokens are accepted it comes from p_n (the bonus token).
The draw is an inverse CDF at one uniform per sequence. The Triton kernel computes the same
residual on the fly, twice, in registers; the [V] residual never reaches global memory.
"""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton


def chain_accept_reference(
    draft_tokens: torch.Tensor,
    lengths: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    u_accept: torch.Tensor,
    u_emit: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence b of a batch, with N = the longest chain:

    draft_tokens [B, N] long (entries past lengths[b] are ignored); lengths [B] long, 0..N;
    target_probs [B, N + 1, V] (row i: p after i drafted tokens); draft_probs [B, N, V];
    u_accept [B, N] and u_emit [B] uniforms in [0, 1).
    Returns (accepted [B] long: drafted tokens kept, next_token [B] long: the token after them).
    """
    B, N = draft_tokens.shape
    p, q = target_probs.float(), draft_probs.float()
    rows = torch.arange(B, device=p.device)
    i = torch.arange(N, device=p.device)
    p_x = p[:, :N].gather(-1, draft_tokens[..., None])[..., 0]  # [B, N]
    q_x = q.gather(-1, draft_tokens[..., None])[..., 0]
    ok = (i[None, :] < lengths[:, None]) & (q_x > 0) & (u_accept.float() * q_x < p_x)
    accepted = torch.where(ok, lengths[:, None], i[None, :]).amin(-1) if N else lengths.clone()
    rejected = accepted < lengths
    p_row = p[rows, accepted]  # [B, V]
    q_row = q[rows, accepted.clamp(max=max(N - 1, 0))] if N else torch.zeros_like(p_row)
    residual = torch.clamp(p_row - q_row * rejected[:, None], min=0.0)
    empty = residual.sum(-1) <= 0  # p <= q everywhere: emit from p itself
    residual = torch.where(empty[:, None], p_row, residual)
    return accepted, _inverse_cdf(residual, u_emit.float())


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [B, V] >= 0 (unnormalised), u [B] -> the first v with cumsum(w)[v] > u * sum(w);
    if rounding leaves none, the last v with positive weight."""
    cum = weights.cumsum(-1)
    target = u * cum[:, -1]
    hit = cum > target[:, None]
    V = weights.shape[-1]
    idx = torch.arange(V, device=weights.device)
    first = torch.where(hit, idx, V).amin(-1)
    last = torch.where(weights > 0, idx, -1).amax(-1)
    return torch.where(first < V, first, last)


def chain_accept(
    draft_tokens: torch.Tensor,
    lengths: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    u_accept: torch.Tensor,
    u_emit: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """chain_accept_reference's result, from the fused Triton kernel where kernels.dispatch says so."""
    if use_triton(target_probs.device):
        from kernels.triton.spec_sampling import chain_accept_triton

        return chain_accept_triton(draft_tokens, lengths, target_probs, draft_probs, u_accept, u_emit)
    return chain_accept_reference(draft_tokens, lengths, target_probs, draft_probs, u_accept, u_emit)
