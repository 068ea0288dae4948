"""The one-off rescaling of a sliced draft's final norm before training.

A slice's final norm was fitted to the target's last-layer residual stream; on an early
layer's stream its logits are far too sharp (loss ~18 nats on SmolLM2's first 4 layers, ~8.7
after rescaling by 1/4). Adam moves the norm weights ~lr per step, so this fix saves
thousands of steps.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from .labels import ChatExample, label_tokens, pad_batch
from .loss import sparse_kl
from .recipe import DraftRecipe
from .tmodel import TrainLlama

# (tokens [B, T], mask [B, T] of labelled positions, top-k ids [B, T, k], top-k log-probs [B, T, k])
LabelledBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

CORPUS_CHUNKS = 4  # labelled corpus chunks, one batch each
CHAT_EXAMPLES = 8  # chat answers, in one batch


def calibration_batches(
    teacher: TrainLlama,
    chunks: Iterator[list[int]],
    chat: Sequence[ChatExample],
    recipe: DraftRecipe,
    rng: random.Random,
    dev: torch.device,
) -> tuple[list[LabelledBatch], list[list[int]]]:
    """A few target-labelled corpus chunks and chat answers on `dev`; also returns the corpus
    chunks it read from `chunks`, for the caller to put back."""
    batches: list[LabelledBatch] = []
    read: list[list[int]] = []
    for _ in range(CORPUS_CHUNKS):
        c = next(chunks, None)
        if c is None:
            break
        read.append(c)
        t = torch.tensor([c], device=dev)
        batches.append((t, torch.ones_like(t, dtype=torch.bool), *label_tokens(teacher, t, recipe.top_k)))
    if chat:
        c_toks, c_ids, c_lps, c_mask = (
            x.to(dev) for x in pad_batch(rng.sample(chat, min(CHAT_EXAMPLES, len(chat))), recipe.top_k)
        )
        batches.append((c_toks, c_mask, c_ids, c_lps))
    return batches, read


@torch.no_grad()
def calibrate_norm_scale(
    draft: TrainLlama,
    batches: Sequence[LabelledBatch],
    vocab: torch.Tensor | None,
    vocab_map: torch.Tensor | None,
    grid: Sequence[float] = (1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.125, 0.09, 0.0625),
) -> float:
    """Rescale the draft's final norm by the factor (from `grid`) with the lowest distillation
    loss on `batches` (on the device); returns the factor."""
    hidden = [(draft(t)[m].float(), ids[m], lps[m]) for t, m, ids, lps in batches]
    w = draft.lm_head.weight.float() if vocab is None else draft.lm_head.weight[vocab].float()
    losses = {}
    for s in grid:
        tot = 0.0
        for h, ids, lps in hidden:
            tot += float(sparse_kl((h * s) @ w.t(), ids, lps, vocab_map)) * h.shape[0]
        losses[s] = tot
    best = min(losses, key=losses.get)
    draft.model.norm.weight.mul_(best)
    return best
