"""The truncated draft vocabulary: the tokens the target emits most, the head restricted to them.

The weights keep the full vocabulary; the list is saved as draft_vocab.json, most frequent
first, so the draft service can restrict its head to any prefix of it at run time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from services.core.tokenizer import Tokenizer

from .labels import ChatExample

CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")
# corpus chunks counted on top of the chat answers when choosing the vocabulary
SAMPLE_CHUNKS = 64


@dataclass
class DraftVocab:
    ids: list[int]  # global ids in draft-column order (most frequent first)
    tensor: torch.Tensor  # [Vd] the same ids, on the device
    column: torch.Tensor  # [V] draft column of each global id, -1 outside the vocabulary


def build_draft_vocab(counts: Counter, size: int, vocab: int, always: Iterable[int]) -> list[int]:
    """The `size` most frequent ids (forced ids first), frequency order, padded with unseen ids."""
    forced = [i for i in dict.fromkeys(always) if 0 <= i < vocab]
    ids = forced + [i for i, _ in counts.most_common() if i not in set(forced)]
    if len(ids) < size:
        seen = set(ids)
        ids += [i for i in range(vocab) if i not in seen][: size - len(ids)]
    return ids[:size]


def always_kept(tok: Tokenizer, eos_ids: Sequence[int]) -> list[int]:
    """Ids every draft vocabulary holds however rare: eos and the chat markers."""
    return [*eos_ids, *(tok.token_to_id(t) for t in CHAT_MARKERS if tok.token_to_id(t))]


def choose_draft_vocab(
    size: int,
    vocab_size: int,
    chat: Sequence[ChatExample],
    chunks: Iterator[list[int]],
    always: Iterable[int],
    device: torch.device,
) -> tuple[DraftVocab | None, list[list[int]]]:
    """The `size` ids the target emits most (its top-1 over the chat answers, plus the tokens of
    up to SAMPLE_CHUNKS corpus chunks); None when `size` keeps the full vocabulary. Also returns
    the chunks it read from `chunks`, for the caller to put back."""
    if not 0 < size < vocab_size:
        return None, []
    counts: Counter = Counter()
    for e in chat:
        counts.update(e.topk_ids[:, 0].tolist())
    sample: list[list[int]] = []
    for _ in range(SAMPLE_CHUNKS):
        c = next(chunks, None)
        if c is None:
            break
        sample.append(c)
        counts.update(c)
    ids = build_draft_vocab(counts, size, vocab_size, always)
    tensor = torch.tensor(ids, device=device)
    column = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
    column[tensor] = torch.arange(len(ids), device=device)
    return DraftVocab(ids, tensor, column), sample
