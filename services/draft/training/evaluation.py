"""How good a draft is: greedy agreement with the target, acceptance bound, decode-step cost."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .labels import ChatExample
from .tmodel import TrainLlama


@torch.no_grad()
def evaluate(
    draft: TrainLlama,
    examples: Sequence[ChatExample],
    vocab: torch.Tensor | None,
    batch: int = 16,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """alpha = share of answer positions where the draft's argmax equals the target's greedy token
    (teacher-forced on the target's own greedy answers); `accept_t1_lb` = mean sum_x min(p, q) over
    the target's top-k (a lower bound of the T=1 acceptance rate)."""
    draft.eval()
    dev = next(draft.parameters()).device
    hit = hit_full = n = covered = 0
    acc = 0.0
    in_vocab = None
    if vocab is not None:
        in_vocab = torch.zeros(draft.config.vocab_size, dtype=torch.bool, device=dev)
        in_vocab[vocab] = True
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        T = max(len(e.tokens) for e in chunk)
        toks = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, e in enumerate(chunk):
            toks[b, : len(e.tokens)] = e.tokens
        with autocast or contextlib.nullcontext():
            hidden = draft(toks.to(dev)).float()
        for b, e in enumerate(chunk):
            h = hidden[b, e.start : len(e.tokens)]
            full = draft.logits(h).float()
            target_tok = torch.tensor(e.answer[: h.shape[0]], device=dev)
            hit_full += int((full.argmax(-1) == target_tok).sum())
            if vocab is not None:
                sub = full[:, vocab]
                pred = vocab[sub.argmax(-1)]
                q_full = torch.full_like(full, 0.0)
                q_full[:, vocab] = sub.softmax(-1)
            else:
                pred = full.argmax(-1)
                q_full = full.softmax(-1)
            hit += int((pred == target_tok).sum())
            covered += int(in_vocab[target_tok].sum()) if in_vocab is not None else len(target_tok)
            ids = e.topk_ids[: h.shape[0]].long().to(dev)
            p = e.topk_logp[: h.shape[0]].float().exp().to(dev)
            acc += float(torch.minimum(p, q_full.gather(-1, ids)).sum())
            n += h.shape[0]
    draft.train()
    return {
        "alpha": hit / max(n, 1),
        "alpha_full_vocab": hit_full / max(n, 1),
        "accept_t1_lb": acc / max(n, 1),
        "vocab_coverage": covered / max(n, 1),
        "eval_tokens": n,
    }


def expected_tau(alpha: float, gamma: int) -> float:
    """Mean tokens per verification round of a chain of `gamma` drafts with i.i.d. acceptance alpha."""
    return float(gamma + 1) if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def decode_cost(model_dir: Path, steps: int = 24, prompt_len: int = 32) -> float:
    """Median seconds of one Engine decode step after a short prefill."""
    from services.core.engine import Engine

    eng = Engine.from_dir(model_dir, max_kv_tokens=4096)
    seq = eng.new_sequence()
    eng.prefill(seq, list(range(10, 10 + prompt_len)))
    times = []
    for i in range(steps):
        t = time.perf_counter()
        eng.decode(seq, 100 + i)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]
