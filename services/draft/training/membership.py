"""A model whose training data is known exactly, for measuring membership inference: a draft
fine-tuned for a few epochs on a member set, with a non-member set of the same corpus held out.

Membership scores (Min-K%, arXiv 2310.16789; Min-K%++, arXiv 2404.02936; DC-PDD, arXiv
2409.14781) ask "was this text in the model's training data?"; evaluating them needs a model
for which the answer is known. Pretrained models' data are not (the paper's benchmark WikiMIA
leans on publication dates), and the shipped draft saw 0.2M tokens of a far larger corpus once,
so neither shows a signal to rank. Here the base draft's prior exposure to both sets is the same
(texts go to a set by a hash of their document, so no document straddles the two), and the
fine-tune is the only difference: plain next-token cross-entropy on each member conditioned on
the start token the scoring service uses, every weight trained.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from services.core.loaders.hf_dir import load_hf_dir
from services.core.tokenizer import Tokenizer

from .checkpoint import rewrite_report, save_draft
from .tmodel import TrainLlama

MEMBERS_FILE = "members.jsonl"
NONMEMBERS_FILE = "nonmembers.jsonl"


@dataclass(frozen=True)
class MembershipRecipe:
    epochs: int = 3
    lr: float = 1e-4
    batch: int = 8
    max_tokens: int = 128  # each text is cut to this many tokens (the same cut is what gets scored)
    seed: int = 0


def split_members(texts: Sequence[tuple[str, str]], n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(document, text) pairs -> (members, non-members), n of each at most: a document's texts
    all go to one side, chosen by a seeded hash of the document's name."""
    members: list[str] = []
    nonmembers: list[str] = []
    for document, text in texts:
        side = hashlib.sha256(f"{seed}:{document}".encode()).digest()[0] % 2
        (members if side == 0 else nonmembers).append(text)
    rng = random.Random(seed)
    rng.shuffle(members)
    rng.shuffle(nonmembers)
    return members[:n], nonmembers[:n]


def cut_text(tokenizer: Tokenizer, text: str, max_tokens: int) -> str:
    """The text cut to its first max_tokens tokens (decoded back, so the service scores the
    very tokens the model trained on)."""
    ids = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    return tokenizer.decode(ids, skip_special_tokens=False)


def _batches(rows: list[list[int]], batch: int, rng: random.Random) -> list[list[list[int]]]:
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [[rows[i] for i in order[k : k + batch]] for k in range(0, len(order), batch)]


def _loss(model: TrainLlama, rows: list[list[int]], pad: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of right-padded rows."""
    width = max(map(len, rows))
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        valid[i, : len(r)] = True
    hidden = model(tokens[:, :-1])  # causal: a real position never reads the padding after it
    logits = model.logits(hidden[valid[:, 1:]])  # [N, V] only where the next token is real
    return F.cross_entropy(logits.float(), tokens[:, 1:][valid[:, 1:]])


def mean_loss(model: TrainLlama, rows: list[list[int]], pad: int, batch: int) -> float:
    with torch.no_grad():
        losses = [
            (_loss(model, rows[k : k + batch], pad), len(rows[k : k + batch]))
            for k in range(0, len(rows), batch)
        ]
    return float(sum(loss * n for loss, n in losses) / len(rows))


def train_membership_model(
    base_dir: Path,
    members: Sequence[str],
    nonmembers: Sequence[str],
    out_dir: Path,
    start_token: int,
    recipe: MembershipRecipe = MembershipRecipe(),
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Path:
    """Fine-tune the model at base_dir on `members` (already cut) and save it to out_dir with
    members.jsonl, nonmembers.jsonl and a train_report.json of the losses on both sets before
    and after (the gap is what membership scores can find)."""
    from tqdm import tqdm

    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    cfg, state = load_hf_dir(base_dir)
    tokenizer = Tokenizer.from_dir(base_dir)
    model = TrainLlama(cfg)
    model.load_hf(state)
    pad = start_token

    def rows_of(texts: Sequence[str]) -> list[list[int]]:
        return [[start_token, *tokenizer.encode(t, add_special_tokens=False)] for t in texts]

    member_rows, nonmember_rows = rows_of(members), rows_of(nonmembers)
    before = {"members": mean_loss(model, member_rows, pad, recipe.batch)}
    before["nonmembers"] = mean_loss(model, nonmember_rows, pad, recipe.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    steps = recipe.epochs * -(-len(member_rows) // recipe.batch)
    t0 = time.time()
    with tqdm(total=steps, desc="membership fine-tune", unit="step", disable=not progress) as bar:
        for epoch in range(recipe.epochs):
            for rows in _batches(member_rows, recipe.batch, rng):
                loss = _loss(model, rows, pad)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    model.eval()
    after = {"members": mean_loss(model, member_rows, pad, recipe.batch)}
    after["nonmembers"] = mean_loss(model, nonmember_rows, pad, recipe.batch)
    report: dict[str, Any] = {
        "kind": "membership reference model",
        "base": str(base_dir),
        "recipe": asdict(recipe),
        "members": len(members),
        "nonmembers": len(nonmembers),
        "member_tokens": sum(len(r) - 1 for r in member_rows),
        "steps": steps,
        "train_s": round(time.time() - t0, 1),
        "loss_before": before,
        "loss_after": after,
    }
    provenance = {"membership_finetune_of": str(base_dir), "recipe": asdict(recipe)}
    out = save_draft(out_dir, cfg, model.hf_state_dict(), base_dir, provenance, report)
    for name, texts in ((MEMBERS_FILE, members), (NONMEMBERS_FILE, nonmembers)):
        (out / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    rewrite_report(out, report)  # re-seals the manifest over the two text files
    log(
        f"fine-tuned {len(members)} members x {recipe.epochs} epochs in {report['train_s']} s: loss on "
        f"members {before['members']:.3f} -> {after['members']:.3f}, on non-members "
        f"{before['nonmembers']:.3f} -> {after['nonmembers']:.3f}; saved to {out}"
    )
    return out
