"""H2O: a KV-cache budget that keeps heavy hitters plus a recent window (Zhang et al.,
"H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
arXiv 2306.14048).

H2O scores every cached token by the attention it has received so far, summed over decode
steps (and, here, over the query heads that share a KV head), and under a budget of k
tokens keeps the k/2 most recent ones plus the k/2 heaviest of the rest, evicting one token a
step once the cache is full. The eviction is per layer and per KV head. It changes what the
model computes, so it is only for requests that accept approximate output, never for exact
or speculative (lossless) decoding.

`h2o_keep` is the policy, a pure function of the accumulated scores. `H2OAttention` plays the
part of services.core.attention_batch.AttentionBatch in LlamaModel.forward for B sequences
that decode one token a step, each under its own budget, and is what the perplexity
benchmark (`specmesh bench h2o`) runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kernels.h2o import h2o_accumulate
from services.core.model import LlamaModel


def h2o_keep(scores: torch.Tensor, length: int, budget: int, recent: int) -> torch.Tensor:
    """Indices [..., min(budget, length)], ascending, of the keys to keep among the first
    `length`: the last min(recent, budget) slots, then the highest-scoring of the others
    (-inf scores mark keys already evicted). scores [..., K >= length]."""
    lead = scores.shape[:-1]
    if budget >= length:
        return torch.arange(length, device=scores.device).expand(*lead, length)
    recent = min(recent, budget)
    older = scores[..., : length - recent]
    heavy = older.topk(budget - recent, dim=-1, sorted=False).indices
    window = torch.arange(length - recent, length, device=scores.device).expand(*lead, recent)
    return torch.cat([heavy, window], -1).sort(-1).values


class H2OAttention:
    """Dense per-layer K/V for B sequences decoding in lockstep, sequence b under budget
    budgets[b] (None = the full cache), with H2O's statistics and eviction.

    Evicted keys stay in the dense tensors but are masked out for good (their scores become
    -inf), which computes exactly what dropping them would.
    """

    def __init__(
        self, model: LlamaModel, budgets: list[int | None], max_len: int, recent_share: float = 0.5
    ) -> None:
        cfg = model.config
        B, L, Hkv, D = len(budgets), cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.budgets = budgets
        self.recent = [None if k is None else max(1, round(recent_share * k)) for k in budgets]
        self.k = torch.zeros(L, B, Hkv, max_len, D)
        self.v = torch.zeros_like(self.k)
        self.alive = torch.zeros(L, B, Hkv, max_len, dtype=torch.bool)  # written and not evicted
        self.scores = torch.zeros(L, B, Hkv, max_len)  # accumulated attention per key
        self.length = 0  # tokens written so far (all sequences)

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """q [B, H, 1, D]; k_new, v_new [B, Hkv, 1, D] -> [B, H, 1, D] over the live keys."""
        t = self.length
        B, H, T, D = q.shape
        if T != 1:
            raise ValueError("H2OAttention decodes one token per step")
        self.k[layer, :, :, t] = k_new[:, :, 0]
        self.v[layer, :, :, t] = v_new[:, :, 0]
        self.alive[layer, :, :, t] = True
        n_kv = k_new.shape[1]
        keys, values = self.k[layer, :, :, : t + 1], self.v[layer, :, :, : t + 1]  # [B, Hkv, t+1, D]
        qg = q.view(B, n_kv, H // n_kv, D)  # query heads grouped by their KV head
        logits = qg @ keys.transpose(-1, -2) / math.sqrt(D)  # [B, Hkv, G, t+1]
        logits = logits.masked_fill(~self.alive[layer, :, :, None, : t + 1], float("-inf"))
        attn = logits.softmax(-1)
        h2o_accumulate(self.scores[layer, :, :, : t + 1], attn.reshape(B, H, 1, t + 1))
        return (attn @ values).reshape(B, H, 1, D)

    def advance(self) -> None:
        """After a step's forward: count the token and evict over budget (one key per step)."""
        self.length += 1
        for b, (budget, recent) in enumerate(zip(self.budgets, self.recent, strict=True)):
            if budget is None or self.length <= budget:
                continue
            scores = self.scores[:, b, :, : self.length].masked_fill(
                ~self.alive[:, b, :, : self.length], float("-inf")
            )
            keep = h2o_keep(scores, self.length, budget, recent)  # [L, Hkv, budget]
            alive = torch.zeros_like(self.alive[:, b, :, : self.length])
            alive.scatter_(-1, keep, True)
            self.alive[:, b, :, : self.length] = alive


@torch.inference_mode()
def budget_nll(
    model: LlamaModel, ids: list[int], budgets: list[int | None], on_step: Callable[[], None] | None = None
) -> torch.Tensor:
    """Teacher-forced negative log-likelihood of ids[1:] under each KV budget: [len(budgets),
    len(ids) - 1], token i + 1 predicted after ids[: i + 1] (all budgets in one batch).
    on_step: called after each token (progress bars)."""
    cache = H2OAttention(model, budgets, len(ids))
    B = len(budgets)
    nll = torch.zeros(B, len(ids) - 1)
    for t, token in enumerate(ids[:-1]):
        tokens = torch.full((B, 1), token, dtype=torch.long)
        positions = torch.full((B, 1), t, dtype=torch.long)
        logits, _ = model(tokens, positions, cache)  # [B, 1, V]
        cache.advance()
        nll[:, t] = -logits[:, 0].float().log_softmax(-1)[:, ids[t + 1]]
        if on_step is not None:
            on_step()
    return nll
