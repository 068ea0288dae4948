"""The small model's side of token routing (R2R, arXiv 2505.21600): draft a chain, scoring each
token with the router, and stop at the first token the router sends to the large model.

Unlike a speculative proposal, whose nodes live in tree scratch until the target accepts
some, a routed chain is written straight into the sequence's committed KV: the gateway keeps
every token before the routed one, so the next call commits them without recomputing (see
:func:`reconcile`). The routed token itself is not appended: the target's replacement takes
its place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from services.core.drafting import ChildDraw, draft_distribution, draw_children
from services.core.engine import Engine
from services.core.kv import SequenceKV
from services.core.params import SamplingConfig
from services.core.route_cut import routed

# (hidden [n, H], logits [n, C], token ids [n]) -> divergence probability per token
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[float]]


class TokenRouter(Protocol):
    """What the draft service needs of a loaded router (services.draft.router.Router)."""

    threshold: float  # the default, chosen at training

    def divergence(
        self, hidden: torch.Tensor, logits: torch.Tensor, token_ids: torch.Tensor
    ) -> list[float]: ...


@dataclass
class RoutedChain:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log q(token | chain so far)
    divergence: list[float] = field(default_factory=list)  # the router's probability per token

    def kept(self, threshold: float) -> int:
        """Tokens the small model keeps (all, or those before the routed one)."""
        return routed(self.divergence, threshold)


def draft_routed_chain(
    engine: Engine,
    seq: SequenceKV,
    root: tuple[torch.Tensor, torch.Tensor],
    max_tokens: int,
    sampling: SamplingConfig,
    draw: ChildDraw,
    score: Scorer,
    threshold: float,
    vocab_limit: int = 0,
) -> tuple[RoutedChain, tuple[torch.Tensor, torch.Tensor]]:
    """Draft up to `max_tokens` tokens after `seq`, appending each kept token to `seq`.

    root: (logits [C], hidden [H]) after the sequence's last token. Each token is picked from
    the draft distribution (greedy or drawn as a chain draft is), then scored; the chain ends
    after the first token scored above `threshold` (returned, not appended) or after
    `max_tokens` kept ones. Returns the chain and the (logits, hidden) after the last kept
    token, the next call's root.
    """
    chain = RoutedChain()
    logits, hidden = root
    for _ in range(max_tokens):
        limited = logits
        if 0 < vocab_limit < logits.shape[-1]:
            limited = logits.clone()
            limited[vocab_limit:] = float("-inf")
        ids, q = draft_distribution(limited, sampling, engine.vocab_ids)
        (j,) = draw_children(ids, q, 1, True, sampling.greedy, draw)
        token = int(ids[j])
        (divergence,) = score(hidden[None], logits[None], torch.tensor([token]))
        chain.tokens.append(token)
        chain.logprobs.append(float(q[j].log()))
        chain.divergence.append(float(divergence))
        if chain.kept(threshold) < len(chain.tokens):
            break
        new_logits, new_hidden = engine.forward([seq], [[token]])
        logits, hidden = new_logits[0][-1], new_hidden[0][-1]
    return chain, (logits, hidden)


def reconcile(seq: SequenceKV, committed: list[int]) -> int:
    """Cut `seq` back to its longest prefix that agrees with the `committed` token history and
    return that length: KV written ahead of the history (a routed chain's tokens) stays only
    where the history confirms it."""
    n = 0
    for have, want in zip(seq.tokens, committed, strict=False):
        if have != want:
            break
        n += 1
    if n < seq.length:
        seq.truncate(n)
    return n
