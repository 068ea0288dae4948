"""H2O's KV budget (services.core.h2o): the keep set is heavy hitters plus the recent window;
through the real model code, an unbounded budget is the ordinary forward, a budget holds
exactly that many live keys per layer and KV head, evicted keys never return, and a tight
budget changes the predictions."""

from __future__ import annotations

import torch
from tiny_models import tiny_config

from services.core.engine import Engine
from services.core.h2o import H2OAttention, budget_nll, h2o_keep

IDS = [int(x) for x in torch.randint(3, 97, (48,), generator=torch.Generator().manual_seed(0))]


def test_keep_set_is_heavy_hitters_plus_recent_window() -> None:
    scores = torch.tensor([[[5.0, 0.1, 9.0, 0.2, 7.0, 0.0, 0.0, 0.3]]])  # [1, 1, 8]
    assert h2o_keep(scores, length=8, budget=4, recent=2).tolist() == [[[2, 4, 6, 7]]]  # 9 and 7, then 6, 7
    assert h2o_keep(scores, length=8, budget=8, recent=2).tolist() == [[list(range(8))]]
    assert h2o_keep(scores, length=5, budget=3, recent=5).tolist() == [[[2, 3, 4]]]  # all recent
    evicted = scores.clone()
    evicted[..., 2] = float("-inf")  # an evicted key is never chosen again
    assert 2 not in h2o_keep(evicted, length=8, budget=4, recent=2).flatten().tolist()


def test_unbounded_budget_is_the_ordinary_forward() -> None:
    engine = Engine.from_config(tiny_config(), seed=5)
    logits = engine.extend(engine.new_sequence(), IDS[:-1])  # [47, V]
    expected = -logits.log_softmax(-1)[torch.arange(len(IDS) - 1), torch.tensor(IDS[1:])]
    nll = budget_nll(engine.model, IDS, [None, len(IDS)])
    assert (nll - expected).abs().max() <= 1e-4


def test_a_budget_holds_that_many_live_keys_and_evictions_are_final() -> None:
    engine = Engine.from_config(tiny_config(), seed=6)
    budget = 12
    cache = H2OAttention(engine.model, [budget, None], len(IDS))
    ever_evicted = torch.zeros_like(cache.alive[:, 0])
    for t, token in enumerate(IDS):
        engine.model(torch.full((2, 1), token), torch.full((2, 1), t), cache)
        cache.advance()
        live = cache.alive[:, 0, :, : t + 1]  # [layers, kv heads, t + 1]
        assert (live.sum(-1) == min(budget, t + 1)).all()
        assert live[..., max(0, t + 1 - cache.recent[0]) : t + 1].all()  # the recent window
        assert not (live & ever_evicted[..., : t + 1]).any()
        ever_evicted[..., : t + 1] |= ~live
        assert cache.alive[:, 1, :, : t + 1].all()  # the unbounded sequence keeps everything
    nll = budget_nll(engine.model, IDS, [None, 6])
    assert (nll[1] - nll[0]).abs().max() > 1e-3  # evicting changes what the model predicts
