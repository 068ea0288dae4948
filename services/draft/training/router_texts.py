"""The texts router labels are computed over (R2R, arXiv 2505.21600), each held out as a whole.

R2R labels the large model's own responses: the router is asked about a small model that
follows a context the large model shaped. Here that is the target's greedy answers to real
chat prompts (`data.chat_prompts`, through `sources.prompt_pool`), plus windows of real corpus
text (`sources.token_documents`: CPython stdlib, man pages, /usr/share/doc), so the router
also sees code and prose the target did not write. `data.is_excluded` keeps the benchmark
sources and the reserved evaluation texts (git's documentation, the Python FAQ, third-party
packages) out of both.

The held-out split is by prompt and by document, never by position: neighbouring positions of
one text share most of their context, so a split by position would leak.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .tmodel import TrainLlama, generate_batch


@dataclass
class LabelText:
    tokens: list[int]  # x_0 .. x_{T-1}
    start: int  # first labelled position (>= 1: position i is predicted from x_<i)
    end: int  # one past the last labelled position
    source: str  # "chat" or "corpus"
    held_out: bool
    # chat answers: the tokens after each labelled position are the target's own greedy
    # continuation, so a branch's reference needs no decode of its own
    greedy_text: bool


def held_out_count(n: int, holdout: float) -> int:
    """How many of n prompts (or documents) are held out: at least one, and one left to train on."""
    return min(n - 1, max(1, round(n * holdout))) if n > 1 else 0


def chat_texts(
    teacher: TrainLlama,
    prompts: Sequence[list[int]],
    *,
    answer_tokens: int,
    window: int,
    holdout: float,
    eos_ids: Sequence[int],
    pad_id: int,
    batch: int,
    tick: Callable[[int], None],
) -> list[LabelText]:
    """The target's greedy answers to `prompts` (token ids), the first `holdout` share held out.

    Each answer is decoded `window` tokens past the `answer_tokens` labelled ones, so every
    labelled position has its full reference continuation in the text (unless eos came first).
    `tick(n)` after each batch of n answers.
    """
    n_held = held_out_count(len(prompts), holdout)
    order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))  # similar lengths: less padding
    out: list[LabelText | None] = [None] * len(prompts)
    for lo in range(0, len(order), batch):
        idx = order[lo : lo + batch]
        gens = generate_batch(
            teacher,
            [prompts[j] for j in idx],
            max_new_tokens=answer_tokens + window,
            eos_ids=eos_ids,
            top_k_store=1,
            pad_id=pad_id,
        )
        for j, g in zip(idx, gens, strict=True):
            p = list(prompts[j])
            n = min(len(g.tokens), answer_tokens)
            out[j] = LabelText(p + g.tokens, len(p), len(p) + n, "chat", j < n_held, greedy_text=True)
        tick(len(idx))
    return [t for t in out if t is not None and t.end > t.start]


def corpus_texts(
    token_docs: Iterator[list[int]],
    n: int,
    *,
    seq_len: int,
    context: int,
    holdout: float,
    rng: random.Random,
) -> list[LabelText]:
    """One window of `seq_len` tokens (a random offset) from each of the first n documents long
    enough for it, the first `holdout` share held out. Positions before `context` are not
    labelled: a window starts mid-document, and a served draft always has a prompt before it."""
    n_held = held_out_count(n, holdout)
    out: list[LabelText] = []
    for doc in token_docs:
        if len(doc) < context + seq_len // 2:  # too short to be worth a row
            continue
        off = rng.randrange(max(1, len(doc) - seq_len))
        ids = list(doc[off : off + seq_len])
        out.append(LabelText(ids, context, len(ids), "corpus", len(out) < n_held, greedy_text=False))
        if len(out) == n:
            break
    return out


def texts_summary(texts: Sequence[LabelText]) -> dict[str, dict[str, int]]:
    """Texts and labelled positions per source and split (for the report)."""
    out: dict[str, dict[str, int]] = {}
    for t in texts:
        key = f"{t.source}_{'held_out' if t.held_out else 'train'}"
        s = out.setdefault(key, {"texts": 0, "positions": 0})
        s["texts"] += 1
        s["positions"] += t.end - t.start
    return out
