"""H2O's KV budget (services.core.h2o): the keep set is heavy hitters plus the recent window;
through the real model code, an unbounded budget is the ordinary forward, a budget holds
exactly that many live keys per layer and KV head, evicted keys never return, and a tight
budget changes the predictions."""

from __future__ import annotations

import torch
from tiny_models import tiny_config

from services.core.engine import Engine
from services.core.h2o import H2OAttention, H2OPolicy, H2OSequence, budget_nll, h2o_keep

IDS = [int(x) for x in torch.randint(3, 97, (48,), generator=torch.Generator().manual_seed(0))]


def test_keep_set_is_heavy_hitters_plus_recent_window() -> None:
    scores = torch.tensor([[[5.0, 0.1, 9.0, 0.2, 7.0, 0.0, 0.0, 0.3]]])  # [1, 1, 8]
    assert h2o_keep(scores, length=8, budget=4, recent=2).tolist() == [[[2, 4, 6, 7]]]  # 9 and 7, then 6, 7
    assert h2o_keep(scores, length=8, budget=8, recent=2).tolist() == [[list(range(8))]]
    assert h2o_keep(scores, length=5, budget=3, recent=5).tolist() == [[[2, 3, 4]]]  # all recent
    evicted = scores.clone()
    evicted[..., 2] = float("-inf")  # an evicted key is never chosen again
    assert 2 not in h2o_keep(evicted, length=8, budget=4, recent=2).flatten().tolist()


def test_age_normalised_scores_undo_the_head_start_of_old_keys() -> None:
    accumulated = torch.tensor([[3.0, 1.0, 0.9, 0.5]])  # key 0 collected its mass early
    age = torch.tensor([10.0, 2.0, 1.5, 1.0])  # queries that have seen each key
    summed, averaged = H2OPolicy(2, 1, age_normalised=False), H2OPolicy(2, 1, age_normalised=True)
    assert h2o_keep(summed.ranking(accumulated, age), 4, 2, 1).tolist() == [[0, 3]]
    assert h2o_keep(averaged.ranking(accumulated, age), 4, 2, 1).tolist() == [[2, 3]]  # 0.6 > 0.5 > 0.3
    assert H2OPolicy.of(10, 0.75) == H2OPolicy(10, 8) and H2OPolicy.of(8, 0.0).recent == 1


def test_unbounded_budget_is_the_ordinary_forward() -> None:
    engine = Engine.from_config(tiny_config(), seed=5)
    logits = engine.extend(engine.new_sequence(), IDS[:-1])  # [47, V]
    expected = -logits.log_softmax(-1)[torch.arange(len(IDS) - 1), torch.tensor(IDS[1:])]
    nll = budget_nll(engine.model, IDS, [None, H2OPolicy.of(len(IDS), 0.5)])
    assert (nll - expected).abs().max() <= 1e-4


def test_a_budget_holds_that_many_live_keys_and_evictions_are_final() -> None:
    engine = Engine.from_config(tiny_config(), seed=6)
    budget = 12
    policy = H2OPolicy.of(budget, 0.5)
    cache = H2OAttention(engine.model, [policy, None], len(IDS))
    ever_evicted = torch.zeros_like(cache.alive[:, 0])
    for t, token in enumerate(IDS):
        engine.model(torch.full((2, 1), token), torch.full((2, 1), t), cache)
        cache.advance()
        live = cache.alive[:, 0, :, : t + 1]  # [layers, kv heads, t + 1]
        assert (live.sum(-1) == min(budget, t + 1)).all()
        assert live[..., max(0, t + 1 - policy.recent) : t + 1].all()  # the recent window
        assert not (live & ever_evicted[..., : t + 1]).any()
        ever_evicted[..., : t + 1] |= ~live
        assert cache.alive[:, 1, :, : t + 1].all()  # the unbounded sequence keeps everything
    nll = budget_nll(engine.model, IDS, [None, H2OPolicy.of(6, 0.5)])
    assert (nll[1] - nll[0]).abs().max() > 1e-3  # evicting changes what the model predicts


def test_the_served_cache_fed_a_token_a_step_computes_what_the_reference_does() -> None:
    engine = Engine.from_config(tiny_config(), seed=7)
    budget = 10
    for policy in (H2OPolicy(budget, 5, age_normalised=False), H2OPolicy(budget, 7, age_normalised=True)):
        _fed_a_token_a_step(engine, policy)


def _fed_a_token_a_step(engine: Engine, policy: H2OPolicy) -> None:
    budget = policy.budget
    reference = H2OAttention(engine.model, [policy], len(IDS))
    served = H2OSequence(engine.model, policy, chunk=1)
    for t, token in enumerate(IDS):
        with torch.inference_mode():
            expected, _ = engine.model(torch.tensor([[token]]), torch.tensor([[t]]), reference)
        reference.advance()
        got = served.extend([token])
        assert (got - expected[0, 0]).abs().max() <= 1e-5
        # compacted: exactly the reference's live keys, no more slots than budget + one token
        assert served.kept == min(budget, t + 1) and served.k.shape[2] == budget + 1
        assert (reference.alive[:, 0, :, : t + 1].sum(-1) == served.kept).all()


def test_the_served_cache_prefills_in_chunks_and_without_eviction_is_the_ordinary_forward() -> None:
    engine = Engine.from_config(tiny_config(), seed=8)
    seq = engine.new_sequence()
    expected = engine.extend(seq, IDS)[-1]  # next-token logits after all of IDS
    seq.release()
    served = H2OSequence(engine.model, H2OPolicy(len(IDS), 4), chunk=7)  # 7 chunks, the last short
    assert (served.extend(IDS) - expected).abs().max() <= 1e-4
    assert served.length == served.kept == len(IDS)


def test_a_chunked_prefill_over_budget_keeps_the_budget_and_changes_the_predictions() -> None:
    engine = Engine.from_config(tiny_config(), seed=9)
    seq = engine.new_sequence()
    full = engine.extend(seq, IDS)[-1]
    seq.release()
    served = H2OSequence(engine.model, H2OPolicy(8, 4), chunk=16)
    logits = served.extend(IDS)
    assert served.kept == 8 and served.length == len(IDS) and served.k.shape[2] == 8 + 16
    assert (logits - full).abs().max() > 1e-3
    assert torch.isfinite(served.extend([IDS[0]])).all() and served.kept == 8  # decoding goes on
