"""H2O: a KV-cache budget that keeps heavy hitters plus a recent window (Zhang et al.,
"H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
arXiv 2306.14048).

H2O scores every cached token by the attention it has received so far, summed over decode
steps (and, here, over the query heads that share a KV head), and under a budget of k
tokens keeps the k/2 most recent ones plus the k/2 heaviest of the rest, evicting one token a
step once the cache is full. The eviction is per layer and per KV head. It changes what the
model computes, so it is only for requests that accept approximate output, never for exact
or speculative (lossless) decoding.

`H2OPolicy` says how: the budget, the recent window, and whether a key's accumulated attention
is divided by its age (the queries that have seen it) before ranking. The paper sums; a sum
favours old keys, which collected attention while the context was short and each weight
large. On validation texts that are not the benchmark's (the first 1,536 tokens of CPython's
shutil.py and of bash's INTRO), at a 20% budget the age-normalised score with a 75% recent
window raised perplexity by +12.2% / +3.7% where the paper's rule (sum, 50%) gave +16.3% /
+4.5%; it is the served default (services.core.params.KVBudget), and `specmesh bench h2o`
reports both.

`h2o_keep` is the keep-set rule, a pure function of the scores. Two caches play the part of
services.core.attention_batch.AttentionBatch in LlamaModel.forward:

- `H2OAttention`: B sequences decoding one token a step in lockstep, each under its own budget,
  evicted keys masked in dense tensors. The perplexity benchmark (`specmesh bench h2o`) runs it,
  and it is the reference the served cache is tested against.
- `H2OSequence`: one served request (target Generate with `kv_budget`). Its KV is compacted to
  the budget after every forward, so memory stays at budget + one prefill chunk per layer and
  KV head however long the context; a long prompt is prefilled in chunks, each chunk's queries
  attending to the kept keys and causally to each other (the prompt's attention counts towards
  the scores, as in the paper).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.h2o import h2o_accumulate
from services.core.model import LlamaModel


@dataclass(frozen=True)
class H2OPolicy:
    """Keep `budget` keys per layer and KV head: the `recent` newest, then the heaviest of the
    others by accumulated attention (divided by each key's age when age_normalised)."""

    budget: int
    recent: int
    age_normalised: bool = True

    def __post_init__(self) -> None:
        if self.budget < 1 or not 0 <= self.recent <= self.budget:
            raise ValueError(f"need budget >= 1 and 0 <= recent <= budget, got {self.budget}, {self.recent}")

    @classmethod
    def of(cls, budget: int, recent_share: float, age_normalised: bool = True) -> H2OPolicy:
        return cls(budget, min(budget, max(1, round(recent_share * budget))), age_normalised)

    def ranking(self, accumulated: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        """The scores h2o_keep ranks: accumulated [..., K] as is, or divided by age (>= 1, the
        queries that have seen each key; broadcastable to accumulated)."""
        return accumulated / age if self.age_normalised else accumulated


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
    """Dense per-layer K/V for B sequences decoding in lockstep, sequence b under policies[b]
    (None = the full cache), with H2O's statistics and eviction.

    Evicted keys stay in the dense tensors but are masked out for good (their scores become
    -inf), which computes exactly what dropping them would.
    """

    def __init__(self, model: LlamaModel, policies: list[H2OPolicy | None], max_len: int) -> None:
        cfg = model.config
        B, L, Hkv, D = len(policies), cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.policies = policies
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
        n = self.length
        age = torch.arange(n, 0, -1, dtype=torch.float32)  # key j has been seen by n - j queries
        for b, policy in enumerate(self.policies):
            if policy is None or n <= policy.budget:
                continue
            scores = policy.ranking(self.scores[:, b, :, :n], age).masked_fill(
                ~self.alive[:, b, :, :n], float("-inf")
            )
            keep = h2o_keep(scores, n, policy.budget, policy.recent)  # [L, Hkv, budget]
            alive = torch.zeros_like(self.alive[:, b, :, :n])
            alive.scatter_(-1, keep, True)
            self.alive[:, b, :, :n] = alive


class H2OSequence:
    """One sequence's KV under an H2O budget, compacted: per layer, k and v [Hkv, slots, D] hold
    the kept keys in position order, then the current forward's new ones; after the forward
    (`advance`) the slots over budget are dropped. Fed one token a step it computes what
    H2OAttention does for the same policy (the same keep sets, logits equal up to float sums).

    The model is any LlamaModel (fp32, int8 or 4-bit weights); keys arrive already rotated, so
    slots keep their token positions only to know each key's age.
    """

    def __init__(
        self, model: LlamaModel, policy: H2OPolicy, chunk: int = 256, max_len: int | None = None
    ) -> None:
        """max_len: the most tokens the sequence will hold, if known (sizes the buffers)."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model, self.policy = model, policy
        self.chunk = chunk if max_len is None else max(1, min(chunk, max_len))
        # the most a forward ever holds: a full cache plus one chunk
        self.slots = (policy.budget if max_len is None else min(policy.budget, max_len)) + self.chunk
        # allocated by the first extend (on the engine thread, where all torch work belongs)
        self.k = self.v = self.scores = self.positions = None
        self.kept = 0  # slots holding kept keys (equal across layers and heads)
        self.length = 0  # tokens seen (the next position)
        self._new = 0  # tokens of the forward in flight

    def _allocate(self) -> None:
        cfg = self.model.config
        param = next(self.model.parameters())
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, self.slots, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=param.dtype, device=param.device)  # [L, Hkv, slots, D]
        self.v = torch.zeros_like(self.k)
        self.scores = torch.zeros(shape[:-1], dtype=torch.float32, device=param.device)  # [L, Hkv, slots]
        self.positions = torch.zeros(
            shape[:-1], dtype=torch.float32, device=param.device
        )  # of each slot's key

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """q [1, H, T, D]; k_new, v_new [1, Hkv, T, D] -> [1, H, T, D]: each new query over the
        kept keys and the new keys up to its own position."""
        _, H, T, D = q.shape
        n = self.kept
        if layer == 0:
            self.positions[:, :, n : n + T] = torch.arange(self.length, self.length + T, dtype=torch.float32)
        self.k[layer, :, n : n + T] = k_new[0]
        self.v[layer, :, n : n + T] = v_new[0]
        keys, values = self.k[layer, :, : n + T], self.v[layer, :, : n + T]  # [Hkv, n + T, D]
        n_kv = keys.shape[0]
        qg = q[0].reshape(n_kv, H // n_kv * T, D)  # query heads grouped by their KV head, then T
        logits = qg @ keys.transpose(-1, -2) / math.sqrt(D)  # [Hkv, G * T, n + T]
        if T > 1:  # new query i sees the kept keys and new keys 0..i
            future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
            mask = torch.cat([torch.zeros(T, n, dtype=torch.bool, device=q.device), future], 1)
            logits = logits.view(n_kv, H // n_kv, T, n + T).masked_fill(mask, float("-inf"))
        attn = logits.reshape(n_kv, H // n_kv * T, n + T).softmax(-1)
        # [Hkv, G * T, n + T] is [1, H, T, n + T] in head order (head = kv head * G + g)
        h2o_accumulate(self.scores[layer, None, :, : n + T], attn.view(1, H, T, n + T))
        self._new = T
        return (attn @ values).view(n_kv, H // n_kv, T, D).reshape(1, H, T, D)

    def advance(self) -> None:
        """After a forward: keep the budget's heavy hitters and recent window (all layers)."""
        n, budget = self.kept + self._new, self.policy.budget
        self.length += self._new
        self._new = 0
        if n <= budget:
            self.kept = n
            return
        # slots are in position order, so the last `recent` slots are the recent window
        age = self.length - self.positions[:, :, :n]  # [L, Hkv, n]: queries that saw each key
        ranking = self.policy.ranking(self.scores[:, :, :n], age)
        keep = h2o_keep(ranking, n, budget, self.policy.recent)  # [L, Hkv, budget]
        dims = keep.unsqueeze(-1).expand(-1, -1, -1, self.k.shape[-1])
        self.k[:, :, :budget] = self.k[:, :, :n].gather(2, dims)
        self.v[:, :, :budget] = self.v[:, :, :n].gather(2, dims)
        self.scores[:, :, :budget] = self.scores[:, :, :n].gather(2, keep)
        self.positions[:, :, :budget] = self.positions[:, :, :n].gather(2, keep)
        self.scores[:, :, budget:] = 0
        self.kept = budget

    @torch.inference_mode()
    def extend(self, ids: list[int]) -> torch.Tensor:
        """Append ids (in chunks of at most `chunk`); the next-token logits [V] after them."""
        if self.k is None:
            self._allocate()
        device = self.k.device
        logits = None
        for start in range(0, len(ids), self.chunk):
            part = ids[start : start + self.chunk]
            tokens = torch.tensor([part], dtype=torch.long, device=device)  # [1, T]
            positions = torch.arange(self.length, self.length + len(part), device=device)[None]
            last = torch.tensor([len(part) - 1], device=device)
            logits, _ = self.model(tokens, positions, self, logit_rows=last)  # [1, V]
            self.advance()
        if logits is None:
            raise ValueError("extend needs at least one token")
        return logits[0].float().cpu()


@torch.inference_mode()
def budget_nll(
    model: LlamaModel,
    ids: list[int],
    policies: list[H2OPolicy | None],
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Teacher-forced negative log-likelihood of ids[1:] under each policy (None = the full
    cache): [len(policies), len(ids) - 1], token i + 1 predicted after ids[: i + 1], all
    policies in one batch. on_step: called after each token (progress bars)."""
    cache = H2OAttention(model, policies, len(ids))
    B = len(policies)
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
