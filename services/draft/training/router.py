"""`specmesh train router`: the R2R token router for a draft (Fu et al., arXiv 2505.21600).

Recipe (README.md beside this file, "Router"):

1. texts (`router_texts`): the target's greedy answers to real chat prompts and windows of
   real corpus text, a share of the prompts and of the documents held out;
2. labels (`router_labels`): at every position, match / neutral / divergent, from the target's
   greedy continuations after the draft's token and after its own (`rollout`);
3. the network (services.core.routing.RouterNet) on `router_inputs` of the served draft:
   class-weighted BCE with divergent as the positive class, AdamW, a few epochs;
4. the threshold: chosen on the held-out texts for a target recall of divergent tokens (R2R
   picks its threshold for recall too: a divergent token kept costs quality, a neutral one
   routed costs only a target call);
5. files (`router_export`): router.onnx, router.safetensors, router.json in the draft's
   router directory.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kernels.linear_choice import cpu_model  # the report names the CPU it ran on
from services.core.errors import InvalidArgument
from services.core.loaders.hf_dir import load_hf_dir
from services.core.model_store import DEFAULT_MODEL, resolve_model
from services.core.routing import DEFAULT_TOP_K, DEFAULT_WIDTH, RouterNet
from services.core.tokenizer import Tokenizer
from services.draft.router import default_router_dir, draft_identity

from .checkpoint import REPORT_FILE
from .device import cast_copy, choose_threads, label_dtype, pick_device
from .recipe import DraftRecipe
from .router_export import write_router
from .router_labels import (
    DEFAULT_MATCH,
    DEFAULT_MAX_SHIFT,
    DEFAULT_WINDOW,
    RouterData,
    label_texts,
    load_served_draft,
)
from .router_texts import LabelText, chat_texts, corpus_texts, texts_summary
from .sources import prompt_pool, token_documents
from .tmodel import TrainLlama

LABEL_RULE = (
    "mismatch: the served draft's greedy token differs from the target's (teacher-forced); "
    "neutral: from offsets at most `max_shift` apart, the target's greedy continuation after the "
    "draft's token and its own continuation agree on every token left in the window, at least "
    "`match` of them (or fewer, ending in eos in both); divergent: any other mismatch"
)


@dataclass
class RouterRecipe:
    """Everything that defines a router run; saved verbatim in router.json's report."""

    prompts: int = 96  # chat prompts the target answers (held-out share included)
    documents: int = 48  # corpus documents, one window each
    holdout: float = 0.25  # share of prompts and of documents held out
    answer_tokens: int = 96  # labelled tokens per chat answer
    seq_len: int = 256  # corpus window
    context: int = 16  # unlabelled first positions of a corpus window
    window: int = DEFAULT_WINDOW
    recall: float = 0.9  # target recall of divergent tokens on the held-out texts
    epochs: int = 4  # more overfit: held-out AUC 0.695 at 4, 0.675 at 12, 0.652 at 30 (README)
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    top_k: int = DEFAULT_TOP_K
    width: int = DEFAULT_WIDTH
    gen_batch: int = 48  # prompts the target answers together
    int8: bool = True  # draft features as `serve draft` computes them (its default)
    seed: int = 0

    def check(self) -> None:
        if not 0 < self.recall <= 1:
            raise InvalidArgument(f"--recall must be in (0, 1], got {self.recall}", "recall")
        if self.window < 1:
            raise InvalidArgument(f"--window must be at least 1, got {self.window}", "window")
        if self.prompts < 0 or self.documents < 0 or self.prompts + self.documents < 2:
            raise InvalidArgument("need at least 2 prompts + documents (one to hold out)", "prompts")
        if self.epochs < 1:
            raise InvalidArgument(f"--epochs must be at least 1, got {self.epochs}", "epochs")


# --- training and evaluation ----------------------------------------------------------------------


def fit(
    data: RouterData, recipe: RouterRecipe, tick: Callable[[int, float], None] = lambda step, loss: None
) -> RouterNet:
    """RouterNet on the training rows: BCE on "divergent", its class weighted by
    negatives / positives so neither class dominates the loss; AdamW, cosine-decayed lr."""
    torch.manual_seed(recipe.seed)
    net = RouterNet(data.hidden.shape[1], recipe.top_k, recipe.width)
    y = data.divergent.float()  # [N]
    pos = float(y.sum())
    pos_weight = torch.tensor((len(y) - pos) / max(pos, 1.0))
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * math.ceil(len(y) / recipe.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(recipe.seed)
    step = 0
    net.train()
    for _ in range(recipe.epochs):
        for idx in torch.randperm(len(y), generator=gen).split(recipe.batch):
            logits = net(data.hidden[idx], data.embedding[idx], data.top_logprobs[idx])
            loss = F.binary_cross_entropy_with_logits(logits, y[idx], pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            tick(step, loss.item())
    return net.eval()


@torch.inference_mode()
def probabilities(net: RouterNet, data: RouterData) -> torch.Tensor:
    """Divergence probabilities [N] (what router.onnx outputs)."""
    return torch.sigmoid(net(data.hidden, data.embedding, data.top_logprobs))


def threshold_for_recall(scores: torch.Tensor, positive: torch.Tensor, recall: float) -> float:
    """The highest threshold t at which `score > t` still flags `recall` of the positives:
    midway between the ceil(recall * P)-th highest positive score and the next lower score of
    any row (a margin either side). 0.5 when there are no positives."""
    pos = scores[positive].sort(descending=True).values
    if len(pos) == 0:
        return 0.5
    s_k = pos[max(1, math.ceil(recall * len(pos) - 1e-9)) - 1]
    below = scores[scores < s_k]
    return float((s_k + below.max()) / 2) if len(below) else 0.0


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve (the probability a positive outscores a negative, ties half)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    s = scores.double()
    # rank of each score among all, ties averaged: (rows below) + (ties + 1) / 2
    sorted_s = s.sort().values
    below = torch.searchsorted(sorted_s, s, right=False)
    ties = torch.searchsorted(sorted_s, s, right=True) - below
    ranks = below + (ties + 1) / 2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metrics(scores: torch.Tensor, positive: torch.Tensor, threshold: float) -> dict[str, Any]:
    """Precision, recall and flagged share at `threshold`, and the AUC, of divergent detection."""
    flagged = scores > threshold
    tp = int((flagged & positive).sum())
    n_flag, n_pos = int(flagged.sum()), int(positive.sum())
    a = auc(scores, positive)
    return {
        "positions": len(scores),
        "precision": round(tp / n_flag, 4) if n_flag else None,
        "recall": round(tp / n_pos, 4) if n_pos else None,
        "auc": round(a, 4) if a is not None else None,
        "flagged_share": round(n_flag / max(1, len(scores)), 4),
    }


def held_out_report(scores: torch.Tensor, data: RouterData, threshold: float) -> dict[str, Any]:
    """metrics() on all held-out rows and per source (chat answers are the served case)."""
    out = {"all": metrics(scores, data.divergent, threshold)}
    for name, m in (("chat", data.chat), ("corpus", ~data.chat)):
        if m.any():
            out[name] = metrics(scores[m], data.divergent[m], threshold)
    return out


# --- a whole run ----------------------------------------------------------------------------------


def _draft_seed(draft_dir: Path) -> int:
    """The seed the draft was trained with (its train_report.json; the recipe's default without
    one): with it, the chat pool comes in the draft's order, whose first prompts (its n_eval)
    the draft never trained on, and those lead this run's held-out share."""
    try:
        return int(json.loads((draft_dir / REPORT_FILE).read_text())["recipe"]["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return DraftRecipe().seed


def load_teacher(target_dir: Path, dev: torch.device) -> tuple[TrainLlama, torch.dtype]:
    """The target for labelling: bf16 where native (AMX, CUDA; 2.5x faster than fp32 on this
    2-core Xeon), else fp32; and that dtype."""
    cfg, state = load_hf_dir(target_dir)
    target = TrainLlama(cfg)
    target.load_hf(state)
    target.to(dev).eval().requires_grad_(False)
    dtype = label_dtype(dev)
    return (target if dtype == torch.float32 else cast_copy(target, dtype)), dtype


def gather_texts(
    teacher: TrainLlama,
    tok: Tokenizer,
    recipe: RouterRecipe,
    draft_seed: int,
    *,
    prompts: Sequence[str] | None,
    documents: Iterator[str] | None,
    progress: bool,
) -> list[LabelText]:
    """The target's greedy answers to the first recipe.prompts prompts of the pool (in the
    draft's order), then one window of each of recipe.documents corpus documents."""
    from tqdm import tqdm

    eos_ids = list(tok.eos_token_ids) or [teacher.config.eos_token_ids[0]]
    texts: list[LabelText] = []
    if recipe.prompts:
        pool = prompt_pool(prompts, (), DraftRecipe(seed=draft_seed, n_eval=0))[: recipe.prompts]
        encoded = [tok.encode_chat([{"role": "user", "content": q}])[:512] for q in pool]
        with tqdm(
            total=len(encoded), desc="router: target answers", unit="answer", disable=not progress
        ) as bar:
            texts += chat_texts(
                teacher,
                encoded,
                answer_tokens=recipe.answer_tokens,
                window=recipe.window,
                holdout=recipe.holdout,
                eos_ids=eos_ids,
                pad_id=tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0],
                batch=recipe.gen_batch,
                tick=bar.update,
            )
    if recipe.documents:
        # another order than the draft recipe's corpus stream (its seed + 1), so few of these
        # windows are text the draft trained on
        docs = token_documents(documents, (), tok.encode, seed=draft_seed + 1)
        texts += corpus_texts(
            docs,
            recipe.documents,
            seq_len=recipe.seq_len,
            context=recipe.context,
            holdout=recipe.holdout,
            rng=random.Random(recipe.seed),
        )
    return texts


def train_router(
    draft: str | Path,
    target: str | Path | None = None,
    *,
    recipe: RouterRecipe | None = None,
    out: str | Path | None = None,
    root: str | Path | None = None,
    progress: bool = True,
    prompts: Sequence[str] | None = None,
    documents: Iterator[str] | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Label, train, pick the threshold and write the router of `draft`; returns its directory.

    target: default the draft's `draft_of` (config.json), else the default model. prompts /
    documents replace this machine's chat prompts and corpus (tests). threads: torch's CPU
    threads for the run (default: measured, see device.choose_threads); restored afterwards.
    """
    before = torch.get_num_threads()
    try:
        return _train_router(draft, target, recipe, out, root, progress, prompts, documents, threads, log)
    finally:
        torch.set_num_threads(before)


def _train_router(
    draft: str | Path,
    target: str | Path | None,
    recipe: RouterRecipe | None,
    out: str | Path | None,
    root: str | Path | None,
    progress: bool,
    prompts: Sequence[str] | None,
    documents: Iterator[str] | None,
    threads: int | None,
    log: Callable[[str], None],
) -> Path:
    from tqdm import tqdm

    recipe = recipe or RouterRecipe()
    recipe.check()
    t0 = time.time()
    minutes: dict[str, float] = {}

    def lap(name: str) -> None:
        minutes[name] = round((time.time() - t0) / 60 - sum(minutes.values()), 2)

    draft_dir = resolve_model(draft, root)
    draft_of = (json.loads((draft_dir / "config.json").read_text()).get("specmesh") or {}).get("draft_of")
    target_dir = resolve_model(target or draft_of or DEFAULT_MODEL, root)
    out_dir = Path(out) if out is not None else default_router_dir(draft_dir)
    dev = pick_device("auto")
    teacher, ldtype = load_teacher(target_dir, dev)
    engine = load_served_draft(draft_dir, int8=recipe.int8)
    tok = Tokenizer.from_dir(target_dir)
    if threads:
        torch.set_num_threads(threads)
    elif dev.type == "cpu":
        threads = choose_threads()
        log(f"{threads} torch thread(s): measured fastest here")
    lap("load")
    texts = gather_texts(
        teacher, tok, recipe, _draft_seed(draft_dir), prompts=prompts, documents=documents, progress=progress
    )
    lap("texts")

    with tqdm(
        total=sum(t.end - t.start for t in texts), desc="router: labels", unit="tok", disable=not progress
    ) as bar:

        def tick(n: int, summary: dict[str, Any]) -> None:
            bar.set_postfix(
                mismatch=summary["mismatch_rate"], neutral=summary["neutral_share"], refresh=False
            )
            bar.update(n)

        eos_ids = list(tok.eos_token_ids) or [teacher.config.eos_token_ids[0]]
        data = label_texts(
            teacher, engine, texts, top_k=recipe.top_k, window=recipe.window, eos_ids=eos_ids, tick=tick
        )
    del teacher
    lap("labels")
    train, held = data.split(held_out=False), data.split(held_out=True)
    if not len(train.label) or not len(held.label):
        raise InvalidArgument("no labelled positions in the training or the held-out split", "prompts")

    steps = recipe.epochs * math.ceil(len(train.label) / recipe.batch)
    with tqdm(total=steps, desc="router: training", unit="step", disable=not progress) as bar:

        def fit_tick(step: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)

        net = fit(train, recipe, fit_tick)
    scores = probabilities(net, held)
    threshold = threshold_for_recall(scores, held.divergent, recipe.recall)
    lap("training")
    report = {
        "draft": draft_dir.name,
        "target": target_dir.name,
        "recipe": asdict(recipe),
        "label_rule": {
            "rule": LABEL_RULE,
            "window": recipe.window,
            "match": DEFAULT_MATCH,
            "max_shift": DEFAULT_MAX_SHIFT,
        },
        "label_dtype": str(ldtype).removeprefix("torch."),
        "texts": texts_summary(texts),
        "labels": {"all": data.summary(), "train": train.summary(), "held_out": held.summary()},
        "held_out": held_out_report(scores, held, threshold),
        "threshold_selection": f"highest with held-out recall >= {recipe.recall} of divergent tokens",
        "minutes": minutes | {"total_before_export": round((time.time() - t0) / 60, 2)},
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
    }
    config = draft_identity(draft_dir, engine) | {
        "top_k": recipe.top_k,
        "width": recipe.width,
        "threshold": threshold,
        "int8": bool(engine.int8_bytes),
        "target": target_dir.name,
        "report": report,
    }
    write_router(out_dir, net, config)
    log(f"router saved to {out_dir} in {(time.time() - t0) / 60:.1f} min")
    return out_dir
