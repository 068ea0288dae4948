"""Logit processing and sampling as pure functions (temperature, top-k, top-p, greedy).

Kept apart from the model so verification can compute the exact target distribution p
that a sampler would have drawn from (lossless speculative decoding needs it).
"""

from __future__ import annotations

import hashlib

import torch

from services.core.params import SamplingConfig


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Distribution a sampler with `cfg` draws from: [..., V] logits -> [..., V] probs.

    Greedy is the one-hot argmax distribution, which makes greedy a special case of
    the same acceptance math.

    Any temperature > 0 samples, however small: the logits are shifted by their maximum before
    dividing, so the largest becomes 0 and the rest at worst -inf (never inf - inf = NaN). As
    T -> 0+ this is the limit distribution: uniform over the tied maxima, 0 elsewhere (a float32
    denormal such as 1e-45 gives exactly that).
    """
    logits = logits.float()
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = (logits - logits.amax(-1, keepdim=True)) / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if 0.0 < cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix reaching top_p: drop a token once the mass before it does.
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of [..., V] probs -> [...] token ids."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """Next token from [V] logits (argmax when greedy, so no distribution is materialised)."""
    if cfg.greedy:
        return int(logits.argmax())
    return int(sample(probabilities(logits, cfg), generator))


def round_generator(seed: int, counter: int, domain: str = "sample") -> torch.Generator:
    """Counter-based random stream: the same (seed, counter) draws the same numbers on any replica,
    so a retried round reproduces its tokens. `domain` separates the streams of different
    consumers of the same round (draft sampling vs target verification)."""
    digest = hashlib.sha256(f"specmesh-{domain}:{seed}:{counter}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
