"""Attribution on tiny random-weight engines: the dense forward against the engine, ReAGent's
update and stopping rules, determinism under a seed, gradient x input against finite
differences, and the soft faithfulness metrics on a case checkable by hand.

The hand-checkable model has no decoder layers: its next-token distribution depends on the
last input token alone, so for the first target token exactly one context token (the last)
matters, and for later target tokens none does.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import tiny_config

from services.core.engine import Engine
from services.core.scoring import attribution as A
from services.core.scoring.dense_forward import embed, forward_embeddings
from services.core.scoring.faithfulness import normalise, normalised_scores, soft_faithfulness

START = 0
CONTEXT = [5, 17, 30, 44, 9, 12, 60, 71]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_config(tiny_config(), seed=0, block_size=4)


@pytest.fixture(scope="module")
def last_token_engine() -> tuple[Engine, A.Example]:
    """No decoder layers, sharp distributions; the example's first target token is the argmax
    after the context."""
    e = Engine.from_config(tiny_config(num_hidden_layers=0), seed=0, block_size=4)
    with torch.no_grad():
        e.model.norm.weight.fill_(3)
    seq = e.new_sequence()
    first = int(e.prefill(seq, [START, *CONTEXT]).argmax())
    seq.release()
    return e, A.Example(START, CONTEXT, [first, 8, 40])


def test_dense_forward_matches_the_engine(engine) -> None:
    ids = [[START, 5, 7, 9, 11, 3], [START, 8, 2]]
    seqs = [engine.new_sequence() for _ in ids]
    want, _ = engine.forward(seqs, ids)
    for s in seqs:
        s.release()
    padded = torch.tensor([ids[0], ids[1] + [0, 0, 0]])  # [2, 6], right-padded
    with torch.no_grad():
        got = forward_embeddings(
            engine.model, embed(engine.model, padded), torch.tensor([*range(6), 6, 7, 8])
        )
    assert torch.allclose(got, torch.cat(want), atol=1e-5)


def test_update_rule() -> None:
    scores = torch.zeros(2, 3, dtype=torch.float64)
    replaced = torch.tensor([[True, False, False], [True, True, False]])  # two samples
    drop = torch.tensor([[0.5, 0.2], [-0.25, 0.2]])  # [samples, target tokens] log-prob drops
    got = A.update_scores(scores, replaced, drop, active=torch.tensor([True, False]))
    # replaced tokens gain the drop, kept ones lose it, summed over the samples
    assert got[0].tolist() == pytest.approx([0.5 - 0.25, -0.5 - 0.25, -0.5 + 0.25])
    assert got[1].tolist() == [0, 0, 0]  # a stopped token keeps its scores


def test_replacements_and_masks() -> None:
    masks = A.replacement_masks(5, 10, A.replaced_count(10, 0.3), torch.Generator().manual_seed(1))
    assert masks.shape == (5, 10) and masks.sum(-1).tolist() == [3] * 5
    again = A.replacement_masks(5, 10, 3, torch.Generator().manual_seed(1))
    assert torch.equal(masks, again)
    assert [A.replaced_count(n, r) for n, r in ((1, 0.3), (10, 0.3), (7, 1.0), (3, 0.01))] == [1, 3, 7, 1]
    logits = torch.tensor([[0.0, 3.0, 1.0, 0.5], [5.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    # the most probable tokens other than the original, in order
    got = A.replacement_candidates(logits, torch.tensor([1, 2, 0]), 2)
    assert got.tolist() == [[2, 3], [0, 1], [3, 2]]
    left = torch.tensor([[-1.0, -2.0], [-1.0, -3.0], [-0.5, -0.7]])
    right = torch.tensor([[-5.0, -1.0], [-1.0, -1.0], [0.0, 0.0]])
    assert A.choose_replacements(got, left, right).tolist() == [3, 0, 3]


def test_replacements_weigh_both_neighbours(engine) -> None:
    """The two tree forwards give every candidate the scores a fresh sequence per candidate gives."""
    k = 3
    got = A.replacements(engine, A.Example(START, CONTEXT, [3]), k)

    def next_logp(prefix: list[int]) -> torch.Tensor:
        seq = engine.new_sequence()
        try:
            return engine.prefill(seq, prefix).log_softmax(-1)
        finally:
            seq.release()

    for i, x in enumerate(CONTEXT):
        prefix = [START, *CONTEXT[:i]]
        left = next_logp(prefix)
        candidates = A.replacement_candidates(left[None], torch.tensor([x]), k)[0].tolist()
        assert x not in candidates
        score = [
            float(left[c]) + (float(next_logp([*prefix, c])[CONTEXT[i + 1]]) if i + 1 < len(CONTEXT) else 0.0)
            for c in candidates
        ]
        assert int(got[i]) == candidates[max(range(k), key=score.__getitem__)], i


def test_stopping_rule_pieces() -> None:
    importance = torch.tensor([[0.1, 0.5, 0.2, 0.2], [0.7, 0.1, 0.1, 0.1]])
    assert A.keep_mask(importance, 1).tolist() == [[False, True, False, False], [True, False, False, False]]
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    assert A.within_top_k(logits, torch.tensor([2, 0]), 1).tolist() == [True, False]  # a tie counts
    assert A.within_top_k(logits, torch.tensor([2, 0]), 3).tolist() == [True, True]


def test_reagent_finds_the_only_token_that_matters(last_token_engine) -> None:
    e, ex = last_token_engine
    first = A.Example(START, CONTEXT, ex.target[:1])
    never_stop = A.ReagentConfig(top_k=0, max_steps=6)  # the target is never within the top 0
    a = A.reagent(e, e, first, never_stop, torch.Generator().manual_seed(0))
    assert a.steps == [6] and a.stopped == [False]
    assert int(a.importance[0].argmax()) == len(CONTEXT) - 1 and float(a.importance[0, -1]) > 0.9
    assert float(a.importance.sum()) == pytest.approx(1)
    # the stopping rule: once the last token ranks among the kept ones, keeping it (and
    # replacing the rest) leaves the target the top token, so the recursion stops
    cfg = A.ReagentConfig(top_k=1, max_steps=6, min_steps=1)
    b = A.reagent(e, e, first, cfg, torch.Generator().manual_seed(0))
    assert b.stopped == [True] and 1 <= b.steps[0] < 6
    assert int(b.importance[0].argmax()) == len(CONTEXT) - 1
    # no check before min_steps updates: with every token within the top k the check always
    # passes, so the recursion stops at min_steps exactly
    always = A.ReagentConfig(top_k=e.config.vocab_size, max_steps=6, min_steps=3)
    c = A.reagent(e, e, first, always, torch.Generator().manual_seed(0))
    assert c.stopped == [True] and c.steps == [3]


def test_seeded_runs_repeat(engine) -> None:
    ex = A.Example(START, CONTEXT, [3, 8, 40])
    cfg = A.ReagentConfig(max_steps=3)
    runs = {seed: [A.attribute(engine, engine, ex, m, seed, cfg, 2) for m in A.Method] for seed in (7, 7, 8)}
    again = [A.attribute(engine, engine, ex, m, 7, cfg, 2) for m in A.Method]
    for a, b in zip(runs[7], again, strict=True):
        assert torch.equal(a.attribution.importance, b.attribution.importance)
        assert a.attribution.steps == b.attribution.steps
        for name in ("sufficiency", "comprehensiveness"):
            x, y = getattr(a.faithfulness, name), getattr(b.faithfulness, name)
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    reagent_7, reagent_8 = runs[7][0].attribution.importance, runs[8][0].attribution.importance
    assert reagent_7.shape == (3, len(CONTEXT)) and not torch.equal(reagent_7, reagent_8)


def test_gradient_x_input_is_the_derivative_of_scaling_each_embedding(engine) -> None:
    model = copy.deepcopy(engine.model).double()  # finite differences want float64
    ex = A.Example(START, CONTEXT, [3, 8])
    got = A.gradient_x_input(model, ex).importance  # [2, n]
    ids = torch.tensor([[START, *CONTEXT, 3]])

    def logp(i: int, scale: float) -> torch.Tensor:
        e = embed(model, ids).clone()
        e[0, 1 + i] *= scale
        with torch.no_grad():
            lp = forward_embeddings(model, e, torch.arange(len(CONTEXT), len(CONTEXT) + 2)).log_softmax(-1)
        return lp[torch.arange(2), torch.tensor(ex.target)]

    h = 1e-5
    fd = torch.stack([(logp(i, 1 + h) - logp(i, 1 - h)) / (2 * h) for i in range(len(CONTEXT))], dim=1)
    assert torch.allclose(got, fd, rtol=1e-5, atol=1e-9)


def test_faithfulness_by_hand() -> None:
    # p = 0.8 with the context, 0.3 without: the context is worth 0.5 of probability
    f = normalised_scores(
        p=torch.tensor([0.8, 0.8, 0.4]),
        p_keep=torch.tensor([0.7, 0.8, 0.4]),
        p_remove=torch.tensor([0.3, 0.55, 0.1]),
        p_zero=torch.tensor([0.3, 0.3, 0.5]),  # the third token is likelier without the context
    )
    # S = 1 - 0.1, S_0 = 1 - 0.5: NS = 0.4 / 0.5; NC = 0.5 / 0.5
    assert f.sufficiency[:2].tolist() == pytest.approx([0.8, 1.0])
    assert f.comprehensiveness[:2].tolist() == pytest.approx([1.0, 0.5])
    assert math.isnan(f.sufficiency[2]) and math.isnan(f.comprehensiveness[2])
    assert f.means() == pytest.approx((0.9, 0.75))
    q = normalise(torch.tensor([[-1.0, 1.0, 3.0], [-2.0, -1.0, 0.0]]))
    assert q.tolist() == [[0.0, 0.25, 0.75], [1 / 3, 1 / 3, 1 / 3]]


def test_all_mass_on_the_deciding_token_beats_random(last_token_engine) -> None:
    e, ex = last_token_engine
    n, m = len(CONTEXT), len(ex.target)
    one_hot = torch.zeros(m, n, dtype=torch.float64)
    one_hot[:, -1] = 1
    random = torch.rand(m, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def scores(importance: torch.Tensor):
        return soft_faithfulness(
            e.model, START, CONTEXT, ex.target, importance, 4, torch.Generator().manual_seed(1)
        )

    best, rand = scores(one_hot), scores(random)
    # kept whole, the last token alone gives the full probability; removed, none is left
    assert float(best.sufficiency[0]) == pytest.approx(1) and float(
        best.comprehensiveness[0]
    ) == pytest.approx(1)
    assert float(rand.sufficiency[0]) < 0.9 and float(rand.comprehensiveness[0]) < 0.9
    # later target tokens follow a target token: the context is worth nothing to them
    assert best.sufficiency[1:].isnan().all() and rand.comprehensiveness[1:].isnan().all()
    # gradient x input sees the same single token
    g = A.attribute(e, e, ex, A.Method.GRADIENT_X_INPUT, 0, A.ReagentConfig(), 4)
    assert int(g.attribution.importance[0].abs().argmax()) == n - 1
    assert g.faithfulness.means()[0] == pytest.approx(1)
