"""A run's text: chat prompts and corpus token chunks, from data packs, the caller, or this machine.

Precedence: explicit `prompts` / `documents` (tests), then data packs (`specmesh train pack`),
then this machine's files (`data`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

from services.core.errors import InvalidArgument

from . import data
from .pack import DataPack, pack_documents
from .recipe import DraftRecipe


def prompt_pool(prompts: Sequence[str] | None, packs: Sequence[DataPack], recipe: DraftRecipe) -> list[str]:
    """The chat prompts of a run; the first `recipe.n_eval` are held out for evaluation."""
    if prompts is not None:
        pool = list(prompts)
    elif packs:
        pool = list(dict.fromkeys(q for pk in packs for q in pk.prompts))  # packs may share prompts
    else:
        pool = data.chat_prompts(seed=recipe.seed)
    if len(pool) <= recipe.n_eval:
        raise InvalidArgument(
            f"need more than n_eval={recipe.n_eval} chat prompts, got {len(pool)}", "prompts"
        )
    return pool


def token_documents(
    documents: Iterator[str] | None,
    packs: Sequence[DataPack],
    encode: Callable[[str], list[int]],
    seed: int,
) -> Iterator[list[int]]:
    """The corpus as a stream of tokenized documents."""
    if packs:
        return pack_documents(packs, seed=seed)
    docs = documents if documents is not None else data.corpus_documents(seed=seed)
    return (encode(text) for text in docs)


def corpus_chunks(
    token_docs: Iterator[list[int]], seq_len: int, eos_id: int, rng: random.Random, max_chunks: int = 12
) -> Iterator[list[int]]:
    """Fixed-length token chunks of documents joined by eos; each document contributes at most
    `max_chunks` chunks, from a random offset."""
    buf: list[int] = []
    for doc in token_docs:
        ids = list(doc) + [eos_id]
        span = seq_len * max_chunks
        if len(ids) > span:
            off = rng.randrange(len(ids) - span)
            ids = ids[off : off + span]
        buf.extend(ids)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]


def chain(first: list[list[int]], rest: Iterator[list[int]]) -> Iterator[list[int]]:
    """`first`, then the rest of the stream (puts back the chunks a run peeked at)."""
    yield from first
    yield from rest
