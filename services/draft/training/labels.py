"""Target-labelled examples: the target's answers to chat prompts and its top-k over any tokens.

Every labelled position keeps the target's top-k log-probabilities (the soft labels the
distillation loss needs); the answers are decoded many prompts at a time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .recipe import DraftRecipe
from .tmodel import TrainLlama, generate_batch


@dataclass
class ChatExample:
    tokens: torch.Tensor  # [L] prompt + answer[:-1] (model input)
    start: int  # first labelled position (last prompt token)
    topk_ids: torch.Tensor  # [L - start, k] int32
    topk_logp: torch.Tensor  # [L - start, k] float16
    answer: list[int] = field(default_factory=list)


def generate_chat(
    target: TrainLlama,
    prompts: Sequence[list[int]],
    *,
    greedy: bool,
    recipe: DraftRecipe,
    eos_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator,
    max_new_tokens: int | None = None,
    deadline: float | None = None,
) -> list[ChatExample]:
    gens = generate_batch(
        target,
        prompts,
        max_new_tokens=max_new_tokens or recipe.max_new_tokens,
        eos_ids=eos_ids,
        temperature=0.0 if greedy else recipe.temperature,
        top_k_store=recipe.top_k,
        generator=generator,
        pad_id=pad_id,
        deadline=deadline,
    )
    out = []
    for p, g in zip(prompts, gens, strict=True):
        if not g.tokens:
            continue
        seq = list(p) + g.tokens
        out.append(ChatExample(torch.tensor(seq[:-1]), len(p) - 1, g.topk_ids, g.topk_logp, g.tokens))
    return out


def held_out_answers(
    target: TrainLlama,
    prompts: Sequence[list[int]],
    *,
    recipe: DraftRecipe,
    eos_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator,
) -> list[ChatExample]:
    """The target's greedy answers to every prompt (the evaluation set: no time limit)."""
    out: list[ChatExample] = []
    for i in range(0, len(prompts), recipe.gen_batch):
        out += generate_chat(
            target,
            prompts[i : i + recipe.gen_batch],
            greedy=True,
            recipe=recipe,
            eos_ids=eos_ids,
            pad_id=pad_id,
            generator=generator,
            max_new_tokens=recipe.eval_max_new_tokens,
        )
    return out


@dataclass
class ChatAnswers:
    examples: list[ChatExample]
    tokens: int  # answer tokens over all examples
    extra_passes: int  # passes over the prompts after the first (those answers are all sampled)


def answer_prompts(
    teacher: TrainLlama,
    prompts: Sequence[str],
    encode: Callable[[str], list[int]],
    *,
    recipe: DraftRecipe,
    rng: random.Random,
    deadline: float,
    eos_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator,
    tick: Callable[..., None],
) -> ChatAnswers:
    """Target answers (greedy and sampled) to `prompts` in random order until `deadline`;
    `tick(answers=, tokens=)` after each decoded batch."""
    chat: list[ChatExample] = []
    chat_tokens = 0
    order = list(range(len(prompts)))
    rng.shuffle(order)
    cursor = 0
    passes = 0
    while time.time() < deadline and prompts:
        if cursor >= len(order):  # every prompt answered: another pass, sampled only (new answers)
            rng.shuffle(order)
            cursor, passes = 0, passes + 1
        # sort a window of prompts by length so each decode batch has little padding
        window = [encode(prompts[j]) for j in order[cursor : cursor + recipe.gen_batch * 4]]
        cursor += len(window)
        window.sort(key=len)
        for i in range(0, len(window), recipe.gen_batch):
            if time.time() >= deadline:
                break
            greedy = passes == 0 and rng.random() >= recipe.sample_frac
            new = generate_chat(
                teacher,
                window[i : i + recipe.gen_batch],
                greedy=greedy,
                recipe=recipe,
                eos_ids=eos_ids,
                pad_id=pad_id,
                generator=generator,
                deadline=deadline,
            )
            chat += new
            chat_tokens += sum(len(e.answer) for e in new)
            tick(answers=len(chat), tokens=chat_tokens)
    return ChatAnswers(chat, chat_tokens, passes)


@torch.no_grad()
def label_tokens(
    target: TrainLlama, tokens: torch.Tensor, k: int, rows: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target top-k log-probs for every position of tokens [B, T] -> ([B, T, k] int32, [B, T, k] f16)."""
    hidden = target(tokens)
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids, lps = [], []
    for i in range(0, flat.shape[0], rows):
        logits = target.logits(flat[i : i + rows]).float()
        top, idx = logits.topk(k, dim=-1)
        lps.append((top - logits.logsumexp(-1, keepdim=True)).half())
        ids.append(idx.int())
    B, T = tokens.shape
    return torch.cat(ids).view(B, T, k), torch.cat(lps).view(B, T, k)


def pad_batch(
    examples: Sequence[ChatExample], k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chat examples as one right-padded batch: tokens [B, T], top-k ids and log-probs [B, T, k],
    and the mask [B, T] of the labelled (answer) positions."""
    T = max(len(e.tokens) for e in examples)
    B = len(examples)
    toks = torch.zeros(B, T, dtype=torch.long)
    ids = torch.zeros(B, T, k, dtype=torch.int32)
    lps = torch.zeros(B, T, k, dtype=torch.float16)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(examples):
        L = len(e.tokens)
        n = min(L - e.start, e.topk_ids.shape[0])
        toks[b, :L] = e.tokens
        ids[b, e.start : e.start + n] = e.topk_ids[:n]
        lps[b, e.start : e.start + n] = e.topk_logp[:n]
        mask[b, e.start : e.start + n] = True
    return toks, ids, lps, mask
