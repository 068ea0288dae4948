"""The training loop: distil the draft on target-labelled batches until the budget is spent."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .evaluation import evaluate
from .labels import ChatExample, label_tokens, pad_batch
from .loss import sparse_kl
from .progress import Budget, Progress
from .recipe import DraftRecipe
from .tmodel import TrainLlama
from .vocab import DraftVocab

# (tokens [B, T], top-k ids [B, T, k], top-k log-probs [B, T, k], mask [B, T] of labelled positions)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

# no evaluation this close to the deadline: the final one follows anyway
EVAL_MARGIN_S = 30


@dataclass
class DistillResult:
    steps: int
    corpus_tokens: int  # corpus positions labelled and trained on
    chat_tokens: int  # chat answer positions trained on (an answer counts each time it is drawn)
    history: list[dict[str, Any]]  # evaluations: untrained (after calibration), periodic, final
    final: dict[str, float]  # the last evaluation
    final_loss: float | None  # moving average of the training loss
    skipped_nonfinite: int
    minutes: float  # of the budget, at the final evaluation
    timing: dict[str, float]  # seconds: data_s, label_s, train_s, eval_s


class TrainingBatches:
    """Device batches: chat answers (labelled when generated, reshuffled every pass) or corpus
    chunks that the teacher labels just before the draft trains on them (streamed: the draft is
    data-limited). Adds the seconds spent to `timing`."""

    def __init__(
        self,
        chat: Sequence[ChatExample],
        chunks: Iterator[list[int]],
        teacher: TrainLlama,
        recipe: DraftRecipe,
        rng: random.Random,
        dev: torch.device,
        timing: dict[str, float],
    ) -> None:
        self._chat, self._chunks, self._teacher = chat, chunks, teacher
        self._recipe, self._rng, self._dev, self._timing = recipe, rng, dev, timing
        self._order: list[int] = []
        self.chat_tokens = 0
        self.corpus_tokens = 0

    def chat(self) -> Batch:
        t0 = time.time()
        r = self._recipe
        if len(self._order) < r.chat_batch:
            self._order += self._rng.sample(range(len(self._chat)), len(self._chat))
        examples = [self._chat[self._order.pop()] for _ in range(min(r.chat_batch, len(self._chat)))]
        toks, ids, lps, mask = (x.to(self._dev) for x in pad_batch(examples, r.top_k))
        self.chat_tokens += int(mask.sum())
        self._timing["data_s"] += time.time() - t0
        return toks, ids, lps, mask

    def corpus(self) -> Batch | None:
        """None once the corpus is exhausted."""
        t0 = time.time()
        r = self._recipe
        rows = [c for c in (next(self._chunks, None) for _ in range(r.corpus_batch)) if c is not None]
        if not rows:
            return None
        toks = torch.tensor(rows, device=self._dev)
        t_label = time.time()
        self._timing["data_s"] += t_label - t0
        ids, lps = label_tokens(self._teacher, toks, r.top_k)
        self._timing["label_s"] += time.time() - t_label
        mask = torch.ones(toks.shape, dtype=torch.bool, device=self._dev)
        self.corpus_tokens += toks.numel()
        return toks, ids, lps, mask


def learning_rate(recipe: DraftRecipe, step: int, frac: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to a tenth of `lr` as `frac` (the
    share of the training time spent) goes to 1: the schedule follows time, not steps, because
    the budget is time."""
    return (
        recipe.lr * min(1.0, (step + 1) / recipe.warmup_steps) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
    )


def distill(
    draft: TrainLlama,
    teacher: TrainLlama,
    chat: Sequence[ChatExample],
    chunks: Iterator[list[int]],
    vocab: DraftVocab | None,
    recipe: DraftRecipe,
    *,
    rng: random.Random,
    dev: torch.device,
    budget: Budget,
    progress: Progress,
    eval_set: Sequence[ChatExample],
    untrained_eval: dict[str, float],
    train_autocast: Callable[[], contextlib.AbstractContextManager],
    eval_autocast: Callable[[], contextlib.AbstractContextManager],
) -> DistillResult:
    """Train the draft's unfrozen weights with AdamW on a random mix (`chat_frac`) of chat and
    corpus batches until the budget's deadline or `max_steps`; evaluate every `eval_every_s`."""
    vocab_t, vocab_map = (vocab.tensor, vocab.column) if vocab is not None else (None, None)
    draft.requires_grad_(True)
    if not recipe.train_embeddings:
        draft.model.embed_tokens.weight.requires_grad_(False)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    progress.phase("draft: distill")
    t_train = time.time()
    train_budget = max(budget.deadline - t_train, 1e-3)
    timing = {"data_s": 0.0, "label_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
    batches = TrainingBatches(chat, chunks, teacher, recipe, rng, dev, timing)
    step = 0
    next_eval = time.time() + recipe.eval_every_s
    history = [{"t_min": round(budget.elapsed_minutes(), 2), "step": 0, "tokens": 0, **untrained_eval}]
    ema = None
    corpus_done = False
    skipped = 0
    while time.time() < budget.deadline and not (recipe.max_steps and step >= recipe.max_steps):
        if chat and (corpus_done or rng.random() < recipe.chat_frac):
            batch = batches.chat()
        else:
            batch = batches.corpus()
            if batch is None:
                corpus_done = True
                if not chat:
                    break
                continue
        toks, ids, lps, mask = batch
        t_step = time.time()
        lr = learning_rate(recipe, step, (time.time() - t_train) / train_budget)
        for g in opt.param_groups:
            g["lr"] = lr
        with train_autocast():
            hidden = draft(toks)
            h = hidden[mask]
            logits = draft.logits(h, vocab_t)
        loss = sparse_kl(logits, ids[mask], lps[mask], vocab_map)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        lv = loss.item()
        if not (math.isfinite(lv) and math.isfinite(float(gnorm))):
            skipped += 1  # one non-finite batch must not poison the weights
            continue
        opt.step()
        step += 1
        timing["train_s"] += time.time() - t_step
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        progress.tick(
            loss=f"{ema:.3f}",
            chat_tok=batches.chat_tokens,
            corpus_tok=batches.corpus_tokens,
            alpha=f"{history[-1]['alpha']:.3f}",
        )
        if time.time() >= next_eval and time.time() < budget.deadline - EVAL_MARGIN_S:
            t_ev = time.time()
            ev = evaluate(draft, eval_set, vocab_t, autocast=eval_autocast())
            timing["eval_s"] += time.time() - t_ev
            history.append(
                {
                    "t_min": round(budget.elapsed_minutes(), 2),
                    "step": step,
                    "tokens": batches.corpus_tokens + batches.chat_tokens,
                    "loss": ema,
                    **ev,
                }
            )
            progress.write(
                f"[{history[-1]['t_min']:.1f} min] step {step} loss {ema:.3f} alpha {ev['alpha']:.3f} "
                f"(full vocab {ev['alpha_full_vocab']:.3f}) accept@T1>={ev['accept_t1_lb']:.3f}"
            )
            next_eval = time.time() + recipe.eval_every_s
    progress.close()
    final = evaluate(draft, eval_set, vocab_t, autocast=eval_autocast())
    minutes = budget.elapsed_minutes()
    tokens = batches.corpus_tokens + batches.chat_tokens
    history.append({"t_min": round(minutes, 2), "step": step, "tokens": tokens, **final})
    return DistillResult(
        steps=step,
        corpus_tokens=batches.corpus_tokens,
        chat_tokens=batches.chat_tokens,
        history=history,
        final=final,
        final_loss=ema,
        skipped_nonfinite=skipped,
        minutes=minutes,
        timing=timing,
    )
