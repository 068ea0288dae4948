"""The small model's side of token routing on a tiny random engine: a routed chain is the
draft's greedy chain cut at the first routed token, its kept tokens' KV is the KV a fresh
prefill computes, and `reconcile` keeps KV only where the history confirms it."""

from __future__ import annotations

import torch
from tiny_models import tiny_config

from services.core.drafting import multinomial_draw
from services.core.engine import Engine
from services.core.params import SamplingConfig
from services.core.route_cut import routed
from services.core.routed_drafting import draft_routed_chain, reconcile

GREEDY = SamplingConfig(temperature=0.0)
PROMPT = [5, 9, 11, 3, 40]


def engine() -> Engine:
    return Engine.from_config(tiny_config(vocab_size=97, num_hidden_layers=1), seed=2, block_size=4)


def root_of(eng: Engine, seq, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    logits, hidden = eng.forward([seq], [ids])
    return logits[0][-1], hidden[0][-1]


def greedy_chain(eng: Engine, prompt: list[int], n: int) -> list[int]:
    seq = eng.new_sequence()
    out: list[int] = []
    logits = eng.prefill(seq, prompt)
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = eng.decode(seq, out[-1])
    seq.release()
    return out


def flag_at(positions: set[int]):
    """A scorer that routes the chain's tokens at `positions` (by call order) and no other."""
    calls: list[int] = []

    def score(hidden, logits, token_ids) -> list[float]:
        assert hidden.shape[0] == logits.shape[0] == token_ids.shape[0] == 1
        calls.append(int(token_ids[0]))
        return [0.9 if len(calls) - 1 in positions else 0.1]

    return score, calls


def test_routed_cut_rule() -> None:
    assert routed([0.1, 0.2, 0.7, 0.9], 0.5) == 2
    assert routed([0.1, 0.2], 0.5) == 2
    assert routed([0.1, 0.2], 0.0) == 0  # threshold 0 routes every token
    assert routed([0.5], 0.5) == 1  # above, not at, the threshold
    assert routed([], 0.3) == 0


def test_a_routed_chain_is_the_greedy_chain_cut_at_the_first_routed_token() -> None:
    eng = engine()
    expected = greedy_chain(eng, PROMPT, 8)
    seq = eng.new_sequence()
    root = root_of(eng, seq, PROMPT)
    score, calls = flag_at({3, 5})
    chain, (logits, hidden) = draft_routed_chain(
        eng, seq, root, 8, GREEDY, multinomial_draw(None), score, threshold=0.5
    )
    assert chain.tokens == expected[:4] and calls == expected[:4]  # stops at the first routed token
    assert chain.divergence == [0.1, 0.1, 0.1, 0.9] and chain.kept(0.5) == 3
    # the kept tokens are in the sequence's KV, the routed one is not
    assert seq.tokens == PROMPT + expected[:3]
    fresh = eng.new_sequence()
    want_logits, want_hidden = root_of(eng, fresh, PROMPT + expected[:3])
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hidden, want_hidden, atol=1e-4, rtol=1e-4)


def test_an_unrouted_chain_keeps_every_token_and_ends_with_the_next_root() -> None:
    eng = engine()
    expected = greedy_chain(eng, PROMPT, 6)
    seq = eng.new_sequence()
    score, _ = flag_at(set())
    chain, (logits, _) = draft_routed_chain(
        eng, seq, root_of(eng, seq, PROMPT), 5, GREEDY, multinomial_draw(None), score, threshold=0.5
    )
    assert chain.tokens == expected[:5] and chain.kept(0.5) == 5
    assert seq.tokens == PROMPT + expected[:5]
    assert int(logits.argmax()) == expected[5]


def test_reconcile_keeps_kv_only_where_the_history_agrees() -> None:
    eng = engine()
    seq = eng.new_sequence()
    eng.prefill(seq, PROMPT + [7, 8, 9])
    assert reconcile(seq, PROMPT + [7, 8, 9, 10]) == 8 and seq.length == 8  # history ahead: all kept
    assert reconcile(seq, PROMPT + [7, 6]) == 6 and seq.tokens == PROMPT + [7]  # diverges at 6
    assert reconcile(seq, [1, 2]) == 0 and seq.length == 0
