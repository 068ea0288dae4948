"""Plain autoregressive generation with stop rules (EOS / stop ids / stop strings / length)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import torch

from services.core.engine import Engine
from services.core.kv import SequenceKV
from services.core.params import GenerationParams
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
    seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
    gen = torch.Generator().manual_seed(seed)
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.eos_token_ids))
    releaser = TextReleaser(tokenizer, params.stop_strings)
    logits = engine.prefill(seq, prompt_ids)
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
        logits = engine.decode(seq, token)
