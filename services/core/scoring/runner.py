"""Score many texts with one engine (and optionally an observer) in batched forwards.

Each text is scored token by token: token 0 is conditioned on a start token (the model's BOS
or, for SmolLM2, which has none in its texts, the <|endoftext|> document separator it was
trained with), token t on the start token and tokens < t. So a 1-token text has a score, and
a text as long as the model's context still fits (the last token is predicted, never fed).

Texts go through ``Engine.forward`` together, at most ``step_tokens`` rows per forward (long
texts in pieces, their KV kept between pieces), and the per-token features are computed on
``row_block`` rows at a time, so the [rows, V] temporaries stay around 100 MB for a 49k
vocabulary whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.core.engine import Engine
from services.core.scoring.features import TokenFeatures, token_features

STEP_TOKENS = 1024
ROW_BLOCK = 256


@dataclass
class Text:
    ids: list[int]  # the tokens to score, 1..max_context of them
    observer: bool = False  # also run the observer (Binoculars' cross term)
    hidden: bool = False  # also keep the scoring model's hidden states (the learned detector)


def score_texts(
    engine: Engine,
    texts: list[Text],
    start_token: int,
    observer: Engine | None = None,
    step_tokens: int = STEP_TOKENS,
    row_block: int = ROW_BLOCK,
) -> list[TokenFeatures]:
    """Per-token features [n_b] of every text (see features.token_features), with the scoring
    model's hidden states [n_b, H] for the texts that ask for them."""
    inputs = [[start_token] + t.ids[:-1] for t in texts]  # inputs[b][t] predicts texts[b].ids[t]
    models = [(engine, list(range(len(texts))))]
    if observer is not None and any(t.observer for t in texts):
        models.append((observer, [b for b, t in enumerate(texts) if t.observer]))
    logits = {id(m): [[] for _ in texts] for m, _ in models}  # per model, per text: [rows, V] pieces
    hidden: list[torch.Tensor | None] = [None] * len(texts)  # the scoring model's, this piece [rows, H]
    out: list[list[TokenFeatures]] = [[] for _ in texts]
    seqs = {id(m): {b: m.new_sequence() for b in which} for m, which in models}
    try:
        done = [0] * len(texts)
        while any(d < len(t.ids) for d, t in zip(done, texts, strict=True)):
            active = [b for b, t in enumerate(texts) if done[b] < len(t.ids)]
            share = max(1, step_tokens // len(active))
            pieces = {b: inputs[b][done[b] : done[b] + share] for b in active}
            for model, which in models:
                batch = [b for b in active if b in which]
                if batch:
                    rows, states = model.forward(
                        [seqs[id(model)][b] for b in batch], [pieces[b] for b in batch]
                    )
                    for b, r, h in zip(batch, rows, states, strict=True):
                        logits[id(model)][b] = r
                        if model is engine and texts[b].hidden:
                            hidden[b] = h
            for b in active:
                targets = torch.tensor(texts[b].ids[done[b] : done[b] + len(pieces[b])])
                obs = logits[id(observer)][b] if len(models) > 1 and texts[b].observer else None
                f = _features(logits[id(engine)][b], targets, obs, row_block)
                f.hidden = hidden[b]
                out[b].append(f)
                done[b] += len(pieces[b])
    finally:
        for per_model in seqs.values():
            for s in per_model.values():
                s.release()
    return [_cat(parts) for parts in out]


def _features(
    logits: torch.Tensor, targets: torch.Tensor, observer: torch.Tensor | None, row_block: int
) -> TokenFeatures:
    blocks = [
        token_features(
            logits[i : i + row_block],
            targets[i : i + row_block],
            None if observer is None else observer[i : i + row_block],
        )
        for i in range(0, len(targets), row_block)
    ]
    return _cat(blocks)


def _cat(parts: list[TokenFeatures]) -> TokenFeatures:
    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return TokenFeatures(
        logprob=cat("logprob"),
        rank=cat("rank"),
        entropy=cat("entropy"),
        var=cat("var"),
        kurtosis=cat("kurtosis"),
        cross_entropy=cat("cross_entropy"),
        hidden=cat("hidden"),
    )
