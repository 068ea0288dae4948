"""Router labels (R2R): the neutral/divergent rule, planning, batched rollouts, draft features."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import tiny_config

from services.core.engine import Engine
from services.core.routing import router_inputs
from services.draft.training.rollout import TeacherPrefix
from services.draft.training.router_labels import (
    DIVERGENT,
    MATCH,
    NEUTRAL,
    draft_views,
    label_summary,
    plan_text,
    rejoins,
    text_labels,
)
from services.draft.training.router_texts import LabelText, corpus_texts, held_out_count
from services.draft.training.tmodel import TrainLlama

EOS = 2

# --- the rule, on hand-built sequences (tokens are just ids: 10 = " the", 11 = " a", 12 = " file", ...)


@pytest.mark.parametrize(
    ("branch", "reference", "neutral"),
    [
        (
            [11, 12, 13, 14, 15, 16],
            [10, 12, 13, 14, 15, 16],
            True,
        ),  # " a file is.." for " the file is..": p = q = 1
        ([17, 10, 12, 13, 14, 15], [10, 12, 13, 14, 15, 16], True),  # an inserted token: p = 1, q = 0
        ([12, 13, 14, 15, 16, 18], [10, 12, 13, 14, 15, 16], True),  # a dropped token: p = 0, q = 1
        ([11, 12, 13, 20, 21, 22], [10, 12, 13, 14, 15, 16], False),  # touches the reference, leaves again
        ([11, 30, 31, 32, 33, 34], [10, 12, 13, 14, 15, 16], False),  # elsewhere
        ([17, 18, 19, 10, 12, 13], [10, 12, 13, 14, 15, 16], False),  # back too late: shift 3 > 2
        ([11, 20, 21, 22, 14, 15], [10, 12, 13, 40, 14, 15], True),  # back for the last 2 tokens
        ([11, 20, 21, 22, 23, 15], [10, 12, 13, 14, 40, 15], False),  # 1 token in common: < match
    ],
)
def test_rejoins(branch: list[int], reference: list[int], neutral: bool) -> None:
    assert rejoins(branch, reference, match=2, max_shift=2) is neutral


def test_rejoins_at_eos() -> None:
    # both stop right after the differing token ("!" for ".")
    assert rejoins([50, EOS, 9, 9], [51, EOS, 8, 8], eos_ids={EOS})
    # the draft stops one token early, where the reference still ends with eos
    assert rejoins([EOS], [51, EOS], eos_ids={EOS})
    # the draft stops where the target goes on: divergent
    assert not rejoins([EOS, 9, 9], [51, 12, 13, 14], eos_ids={EOS})
    # tokens after eos never count
    assert not rejoins([50, EOS, 12, 13], [51, 12, 13, 14], eos_ids={EOS})


def test_rejoins_needs_match_tokens_after_rejoining() -> None:
    assert rejoins([11, 12, 13], [10, 12, 13], match=2)
    assert not rejoins([11, 12, 13], [10, 12, 13], match=3)


# --- planning and labels ---------------------------------------------------------------------------


def test_plan_and_labels_of_a_chat_answer() -> None:
    # text: prompt [1, 5, 6] then the target's greedy answer [10, 12, 13, 14, 15, 16, 17]
    tokens = [1, 5, 6, 10, 12, 13, 14, 15, 16, 17]
    text = LabelText(tokens, start=3, end=6, source="chat", held_out=False, greedy_text=True)
    greedy = tokens[1:] + [0]  # teacher-forced greedy = the answer (greedy[j] is the choice for j + 1)
    draft = [11, 12, 30]  # mismatch at 3, match at 4, mismatch at 5
    plan = plan_text(text, greedy, draft)
    # the answer is the reference continuation: only the draft's branches are decoded
    assert plan.branches == [(3, 11), (5, 30)]
    assert plan.mismatches == [(3, 0, None), (5, 1, None)]
    cont = [[12, 13], [31, 32]]  # window 2: the first rejoins the answer, the second does not
    labels = text_labels(text, greedy, draft, plan, cont, window=2, eos_ids={EOS})
    assert labels == [NEUTRAL, MATCH, DIVERGENT]


def test_plan_decodes_the_reference_where_the_text_is_not_the_targets() -> None:
    tokens = [1, 5, 6, 7, 8]
    text = LabelText(tokens, start=2, end=5, source="corpus", held_out=True, greedy_text=False)
    greedy = [5, 9, 7, 9, 0]  # target: 5 at 1, 9 at 2, 7 at 3, 9 at 4
    draft = [9, 3, 9]  # match at 2, mismatch at 3 (target 7), match at 4
    plan = plan_text(text, greedy, draft)
    assert plan.branches == [(3, 3), (3, 7)]  # the draft's token, then the target's own
    assert plan.mismatches == [(3, 0, 1)]
    labels = text_labels(text, greedy, draft, plan, [[40, 41], [40, 41]], window=2, eos_ids={EOS})
    assert labels == [MATCH, NEUTRAL, MATCH]
    labels = text_labels(text, greedy, draft, plan, [[40, 41], [42, 43]], window=2, eos_ids={EOS})
    assert labels == [MATCH, DIVERGENT, MATCH]


def test_label_summary() -> None:
    s = label_summary(torch.tensor([MATCH, NEUTRAL, DIVERGENT, DIVERGENT], dtype=torch.int8))
    assert s == {
        "positions": 4,
        "match": 1,
        "neutral": 1,
        "divergent": 2,
        "mismatch_rate": 0.75,
        "neutral_share": round(1 / 3, 4),
    }


# --- texts ---------------------------------------------------------------------------------------------


def test_held_out_count() -> None:
    assert [held_out_count(n, 0.25) for n in (0, 1, 2, 8, 96)] == [0, 0, 1, 2, 24]


def test_corpus_texts_split_by_document() -> None:
    docs = iter([list(range(300)), list(range(5)), list(range(100, 400)), list(range(200))])
    texts = corpus_texts(docs, 3, seq_len=64, context=8, holdout=0.34, rng=random.Random(0))
    assert len(texts) == 3  # the 5-token document is too short
    assert [t.held_out for t in texts] == [True, False, False]
    for t in texts:
        assert len(t.tokens) == 64 and t.start == 8 and t.end == 64 and not t.greedy_text


# --- batched rollouts and draft features on tiny random models -----------------------------------------


def _tiny_teacher() -> TrainLlama:
    torch.manual_seed(0)
    m = TrainLlama(tiny_config())
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)  # peaked logits: few argmax ties
    return m.eval()


def _naive_greedy(m: TrainLlama, context: list[int], n: int) -> list[int]:
    seq = list(context)
    for _ in range(n):
        with torch.no_grad():
            seq.append(int(m.logits(m(torch.tensor([seq]))[0, -1]).argmax()))
    return seq[len(context) :]


@pytest.mark.parametrize("group", [64, 2])
def test_teacher_prefix_matches_one_decode_per_branch(group: int) -> None:
    m = _tiny_teacher()
    rng = random.Random(0)
    texts = [[rng.randrange(3, 97) for _ in range(n)] for n in (23, 9, 15)]
    branches = [[(4, 7), (23, 9), (11, 30)], [], [(1, 3), (15, 5)]]
    prefix = TeacherPrefix(m, texts)
    for t, g in zip(texts, prefix.greedy, strict=True):
        assert g == [_naive_greedy(m, t[: j + 1], 1)[0] for j in range(len(t))]
    cont = prefix.continue_greedily(branches, steps=4, group=group)
    for t, bs, cs in zip(texts, branches, cont, strict=True):
        assert cs == [_naive_greedy(m, t[:i] + [f], 4) for i, f in bs]


def test_draft_views_are_the_drafts_greedy_tokens_and_router_inputs() -> None:
    engine = Engine.from_config(tiny_config(), seed=1)
    vocab = list(range(96, 0, -2))  # a truncated head in another order than the ids
    engine.restrict_vocab(vocab)
    tokens = [5, 9, 3, 40, 41, 8, 7]
    text = LabelText(tokens, start=2, end=7, source="corpus", held_out=False, greedy_text=False)
    free = engine.pool.free_blocks
    (view,) = draft_views(engine, [text], top_k=8)
    assert engine.pool.free_blocks == free  # its sequences are released
    seq = engine.new_sequence()
    logits, hidden = (x[0][1:] for x in engine.forward([seq], [tokens[:-1]]))  # rows 1..5: positions 2..6
    seq.release()
    ids = torch.tensor(vocab)[logits.argmax(-1)]  # full-vocabulary ids
    assert view.tokens == ids.tolist()
    h, e, top = router_inputs(hidden, logits, ids, engine.model.embed_tokens.weight, 8)
    assert torch.allclose(view.hidden, h, atol=1e-5) and torch.equal(view.embedding, e)
    assert torch.allclose(view.top_logprobs, top, atol=1e-5)
