"""Plain autoregressive generation with stop rules (EOS / stop ids / stop strings / length), on
the engine's paged KV or, for one request, under an H2O KV budget (services.core.h2o)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

import torch

from services.core.engine import Engine
from services.core.h2o import H2OPolicy, H2OSequence
from services.core.kv import SequenceKV
from services.core.params import GenerationParams, KVBudget
from services.core.sampling import next_token
from services.core.text_stream import TextReleaser
from services.core.tokenizer import Tokenizer


class Finish(StrEnum):
    LENGTH = "length"
    EOS = "eos"
    STOP_STRING = "stop_string"


@dataclass
class Step:
    token_ids: list[int]  # new token(s) this step (empty on a closing step)
    text: str  # newly released text; held back while it could still start a stop string
    finish: Finish | None = None


def generate(
    engine: Engine,
    tokenizer: Tokenizer,
    seq: SequenceKV,
    prompt_ids: list[int],
    params: GenerationParams,
) -> Iterator[Step]:
    """Prefill prompt_ids into seq, then yield one Step per generated token.

    The generated tokens (but for the last one, whose KV is never needed) end up in seq.
    The last Step carries `finish`.
    """
    return sampled_steps(
        tokenizer, params, lambda: engine.prefill(seq, prompt_ids), lambda t: engine.decode(seq, t)
    )


def generate_with_kv_budget(
    engine: Engine,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    params: GenerationParams,
    budget: KVBudget,
) -> Iterator[Step]:
    """generate() for a request under an H2O KV budget (arXiv 2306.14048). Its KV is its own,
    not the engine's pool, and is dropped with the iterator."""
    max_len = len(prompt_ids) + params.max_new_tokens
    policy = H2OPolicy.of(budget.max_tokens, budget.recent_share)
    cache = H2OSequence(engine.model, policy, max_len=max_len)
    return sampled_steps(tokenizer, params, lambda: cache.extend(prompt_ids), lambda t: cache.extend([t]))


def sampled_steps(
    tokenizer: Tokenizer,
    params: GenerationParams,
    prefill: Callable[[], torch.Tensor],
    decode: Callable[[int], torch.Tensor],
) -> Iterator[Step]:
    """The sampling loop over any KV: prefill() gives the first next-token logits [V] (run at
    the first next()), decode(token) appends a token and gives the logits after it."""
    seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
    gen = torch.Generator().manual_seed(seed)
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.eos_token_ids))
    releaser = TextReleaser(tokenizer, params.stop_strings)
    logits = prefill()
    for i in range(params.max_new_tokens):
        token = next_token(logits, params.sampling, gen)
        if token in stop_ids:
            yield Step([token], releaser.flush(), Finish.EOS)
            return
        text, stopped = releaser.push(token)
        if stopped:
            yield Step([token], text, Finish.STOP_STRING)
            return
        if i == params.max_new_tokens - 1:
            yield Step([token], text + releaser.flush(), Finish.LENGTH)
            return
        yield Step([token], text)
        logits = decode(token)
