"""Router labels: which of the draft's tokens would send the continuation elsewhere (R2R).

R2R (Fu et al., arXiv 2505.21600) routes a token to the large model only when the small
model's choice *diverges*: not merely differs from the large model's token, but changes where
the continuation goes. Its labels come from continuing the large model after each differing
token and asking a verifier model whether the meaning changed. The cheap proxy here needs no
verifier, only the target:

1. over a text, the target teacher-forced gives its greedy token t_i at every position i, and
   the draft, served exactly as the draft service serves it (truncated vocabulary, int8
   projections; see `load_served_draft`), gives its greedy token d_i, hidden state and logits;
2. i is a *match* when d_i == t_i, else a *mismatch*;
3. for a mismatch, the target continues greedily for `window` tokens after d_i (the branch)
   and after t_i (the reference; for the target's own answers that is the text itself), and
   `rejoins` decides: **neutral** when the branch finds its way back to the reference,
   **divergent** when it does not.

The router learns to flag divergent tokens; matches and neutral mismatches are both fine to
keep.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from services.core.engine import Engine
from services.core.model_store import load_draft_vocab
from services.core.routing import router_inputs

from .rollout import TeacherPrefix
from .router_texts import LabelText
from .tmodel import TrainLlama

MATCH, NEUTRAL, DIVERGENT = 0, 1, 2
LABEL_NAMES = {"match": MATCH, "neutral": NEUTRAL, "divergent": DIVERGENT}
DEFAULT_WINDOW = 5  # continuation tokens after the draft's token
DEFAULT_MATCH = 2  # tokens a rejoined branch must agree on, at least
DEFAULT_MAX_SHIFT = 2  # tokens the draft's choice may have added or dropped


def _cut_after_eos(ids: Sequence[int], eos_ids: Collection[int]) -> list[int]:
    for n, t in enumerate(ids):
        if t in eos_ids:
            return list(ids[: n + 1])
    return list(ids)


def rejoins(
    branch: Sequence[int],
    reference: Sequence[int],
    *,
    match: int = DEFAULT_MATCH,
    max_shift: int = DEFAULT_MAX_SHIFT,
    eos_ids: Collection[int] = (),
) -> bool:
    """True when the branch rejoins the reference and stays on it: the neutral label.

    branch = [d, c_1, .., c_W]: the draft's token and the target's greedy continuation after it;
    reference = [t, r_1, .., r_W]: the target's own token and its greedy continuation. Both are
    cut after their first eos. The rule: there are offsets p into branch and q into reference
    with |p - q| <= max_shift from which the two agree on every token left in the window,
    branch[p : p + L] == reference[q : q + L] with L = min(len(branch) - p, len(reference) - q),
    and L >= match, or L >= 1 when those tokens end with eos (both stop the same way).

    So the draft's token may replace, add or drop up to max_shift tokens before the target is
    back on its own path (" a file is" for " the file is": p = q = 1; " big" before " file is":
    p = 1, q = 0; " is" for " file is": p = 0, q = 1), but a continuation that only touches the
    reference and leaves again (" `pip` command" against " `pip-install") is divergent, as is
    one that stops where the reference goes on. Anything else within the window is divergent
    too: with W continuation tokens the rejoin must come by offset W + 1 - match.
    """
    b, a = _cut_after_eos(branch, eos_ids), _cut_after_eos(reference, eos_ids)
    for p in range(len(b)):
        for q in range(max(0, p - max_shift), min(len(a), p + max_shift + 1)):
            n = min(len(b) - p, len(a) - q)
            if b[p : p + n] == a[q : q + n] and (n >= match or b[p + n - 1] in eos_ids):
                return True
    return False


@dataclass
class Plan:
    """The continuations one text needs: `branches` (i, first token) for TeacherPrefix, and per
    mismatch i, the branch index of the draft's token and of the reference (None: the text)."""

    branches: list[tuple[int, int]]
    mismatches: list[tuple[int, int, int | None]]  # (i, draft branch, reference branch or None)


def plan_text(text: LabelText, greedy: Sequence[int], draft: Sequence[int]) -> Plan:
    """greedy: TeacherPrefix.greedy of the text; draft[n]: the draft's token at text.start + n."""
    plan = Plan([], [])
    for n, d in enumerate(draft):
        i = text.start + n
        t = greedy[i - 1]
        if d == t:
            continue
        nb, ref = len(plan.branches), None
        plan.branches.append((i, d))
        if not (text.greedy_text and text.tokens[i] == t):  # the text is not t's continuation
            ref = len(plan.branches)
            plan.branches.append((i, t))
        plan.mismatches.append((i, nb, ref))
    return plan


def text_labels(
    text: LabelText,
    greedy: Sequence[int],
    draft: Sequence[int],
    plan: Plan,
    cont: Sequence[Sequence[int]],
    *,
    window: int,
    eos_ids: Collection[int],
    match: int = DEFAULT_MATCH,
    max_shift: int = DEFAULT_MAX_SHIFT,
) -> list[int]:
    """MATCH / NEUTRAL / DIVERGENT for each labelled position of the text (cont: the plan's
    branch continuations, `window` tokens each)."""
    labels = [MATCH] * (text.end - text.start)
    for i, nb, nr in plan.mismatches:
        branch = [plan.branches[nb][1], *cont[nb]]
        # the reference: the text itself after t_i, or the target's own decode after t_i
        reference = text.tokens[i : i + window + 1] if nr is None else [greedy[i - 1], *cont[nr]]
        neutral = rejoins(branch, reference, match=match, max_shift=max_shift, eos_ids=eos_ids)
        labels[i - text.start] = NEUTRAL if neutral else DIVERGENT
    return labels


def load_served_draft(draft_dir: Path, *, int8: bool = True, max_kv_tokens: int = 8192) -> Engine:
    """The draft engine as the draft service prepares it (services/draft/server.py, load_draft):
    head restricted to the whole draft_vocab.json, int8 projections unless `int8` is False
    (`serve draft --no-int8`), so the router trains on the features it will be served."""
    engine = Engine.from_dir(draft_dir, max_kv_tokens=max_kv_tokens)
    vocab = load_draft_vocab(draft_dir)
    if vocab:
        engine.restrict_vocab(vocab)
    if int8:
        engine.quantize_int8()  # 0 bytes where fbgemm is missing: the service then runs fp32 too
    return engine


@dataclass
class DraftView:
    tokens: list[int]  # the draft's greedy token (full-vocabulary id) at each labelled position
    hidden: torch.Tensor  # [n, H] router inputs, see services.core.routing.router_inputs
    embedding: torch.Tensor  # [n, H]
    top_logprobs: torch.Tensor  # [n, k]


def draft_views(engine: Engine, texts: Sequence[LabelText], top_k: int) -> list[DraftView]:
    """The draft's greedy tokens and router inputs at every labelled position of each text."""
    seqs = [engine.new_sequence() for _ in texts]
    try:
        # position i is predicted at row i - 1: feed x_0 .. x_{end-2}, logits of rows start-1 ..
        logits, hidden = engine.forward(
            seqs,
            [t.tokens[: t.end - 1] for t in texts],
            logit_rows=[list(range(t.start - 1, t.end - 1)) for t in texts],
        )
    finally:
        for s in seqs:
            s.release()
    embedding = engine.model.embed_tokens.weight.detach()
    out = []
    for t, lg, h in zip(texts, logits, hidden, strict=True):
        col = lg.argmax(-1)  # [n] column of the (possibly truncated) head
        ids = engine.vocab_ids[col] if engine.vocab_ids is not None else col
        feats = router_inputs(h[t.start - 1 : t.end - 1], lg, ids, embedding, top_k)
        out.append(DraftView(ids.tolist(), *feats))
    return out


@dataclass
class RouterData:
    """Router inputs and labels, one row per labelled position (training and held-out)."""

    hidden: torch.Tensor  # [N, H] float32
    embedding: torch.Tensor  # [N, H]
    top_logprobs: torch.Tensor  # [N, k]
    label: torch.Tensor  # [N] int8: MATCH / NEUTRAL / DIVERGENT
    held_out: torch.Tensor  # [N] bool
    chat: torch.Tensor  # [N] bool: from a chat answer (else corpus)

    @property
    def divergent(self) -> torch.Tensor:
        return self.label == DIVERGENT

    def split(self, held_out: bool) -> RouterData:
        m = self.held_out == held_out
        return RouterData(*(getattr(self, f.name)[m] for f in fields(self)))

    def summary(self) -> dict[str, float | int]:
        return label_summary(self.label)


def label_summary(label: torch.Tensor) -> dict[str, float | int]:
    """Label counts, the mismatch rate and the neutral share (of mismatches) of labels [N]."""
    n = len(label)
    counts = {name: int((label == v).sum()) for name, v in LABEL_NAMES.items()}
    mismatches = counts["neutral"] + counts["divergent"]
    return {
        "positions": n,
        **counts,
        "mismatch_rate": round(mismatches / max(1, n), 4),
        "neutral_share": round(counts["neutral"] / max(1, mismatches), 4),
    }


def label_texts(
    teacher: TrainLlama,
    draft: Engine,
    texts: Sequence[LabelText],
    *,
    top_k: int,
    window: int,
    eos_ids: Collection[int],
    batch_tokens: int = 1024,
    tick: Callable[[int, dict[str, float | int]], None] = lambda n, summary: None,
) -> RouterData:
    """Label every position of `texts` and collect the draft's router inputs there.

    Texts go in batches of about `batch_tokens` (rows x longest text), sorted by length so rows
    pad little; `tick(positions labelled, label_summary so far)` after each batch.
    """
    order = sorted(range(len(texts)), key=lambda j: len(texts[j].tokens))
    parts: list[tuple[torch.Tensor, ...]] = []
    lo = 0
    while lo < len(order):
        hi = lo + 1
        while hi < len(order) and (hi + 1 - lo) * len(texts[order[hi]].tokens) <= batch_tokens:
            hi += 1
        batch = [texts[j] for j in order[lo:hi]]
        lo = hi
        views = draft_views(draft, batch, top_k)
        prefix = TeacherPrefix(teacher, [t.tokens for t in batch])
        plans = [plan_text(t, g, v.tokens) for t, g, v in zip(batch, prefix.greedy, views, strict=True)]
        conts = prefix.continue_greedily([p.branches for p in plans], window)
        for t, g, v, p, c in zip(batch, prefix.greedy, views, plans, conts, strict=True):
            labels = text_labels(t, g, v.tokens, p, c, window=window, eos_ids=eos_ids)
            n = len(labels)
            parts.append(
                (
                    v.hidden,
                    v.embedding,
                    v.top_logprobs,
                    torch.tensor(labels, dtype=torch.int8),
                    torch.full((n,), t.held_out),
                    torch.full((n,), t.source == "chat"),
                )
            )
        tick(sum(t.end - t.start for t in batch), label_summary(torch.cat([p[3] for p in parts])))
    return RouterData(*(torch.cat(cols) for cols in zip(*parts, strict=True)))
