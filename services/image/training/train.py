"""Train the image models in four phases, each with its own progress bar: the VQ tokenizer, the
judge classifier, the class-conditional AR target and its draft (both on the serving engine's
Llama architecture, HF-named, so `services.core.engine.Engine.from_dir` serves them as is)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from services.core.config import LlamaConfig
from services.draft.training.tmodel import TrainLlama
from services.image import data
from services.image.judge import Judge
from services.image.layout import Layout
from services.image.store import save_image_models
from services.image.training.recipe import ImageRecipe
from services.image.vq import VQVAE


def _cosine_lr(opt: torch.optim.Optimizer, peak: float, step: int, total: int) -> None:
    warm = max(1, total // 20)
    lr = peak * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
    for g in opt.param_groups:
        g["lr"] = lr


def _batches(n: int, batch: int, gen: torch.Generator):
    """Endless shuffled index batches over n items."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


def _bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def train_vq(digits: data.Digits, r: ImageRecipe, dev: torch.device, progress: bool) -> tuple[VQVAE, dict]:
    x_train, _ = digits.split("train")
    gen = torch.Generator().manual_seed(r.seed)
    torch.manual_seed(r.seed)
    vq = VQVAE(r.vq_config()).to(dev)
    # start the codebook on real encoder outputs instead of noise
    with torch.no_grad():
        z = vq.encoder(x_train[: r.batch].to(dev) * 2 - 1).permute(0, 2, 3, 1).reshape(-1, vq.c.dim)
        pick = z[torch.randperm(len(z), generator=gen)[: vq.c.codebook_size].to(dev)]
        vq.codebook.copy_(pick)
        vq.ema_sum.copy_(pick)
    opt = torch.optim.Adam(vq.parameters(), lr=r.lr)
    batches = _batches(len(x_train), r.batch, gen)
    with _bar(r.vq_steps, "vq", progress) as bar:
        for step in range(r.vq_steps):
            _cosine_lr(opt, r.lr, step, r.vq_steps)
            x = data.augment(x_train[next(batches)], gen).to(dev)
            logits, commit, _ = vq(x)
            loss = F.binary_cross_entropy_with_logits(logits, x) + 0.25 * commit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    vq.eval()
    return vq, vq_report(vq, digits, dev)


@torch.no_grad()
def vq_report(vq: VQVAE, digits: data.Digits, dev: torch.device) -> dict:
    """Reconstruction error (mean squared, pixels in [0, 1]) and codebook usage on held-out images."""
    x, _ = digits.split("test")
    ids = vq.encode(x.to(dev))
    recon = vq.decode(ids)
    used = torch.bincount(ids.flatten(), minlength=vq.c.codebook_size)
    probs = used.double() / used.sum()
    perplexity = float(torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum()))
    return {
        "test_mse": float(F.mse_loss(recon, x.to(dev))),
        "codes_used": int((used > 0).sum()),
        "codebook_size": vq.c.codebook_size,
        "code_perplexity": perplexity,
    }


def train_judge(digits: data.Digits, r: ImageRecipe, dev: torch.device, progress: bool) -> tuple[Judge, dict]:
    x_train, y_train = digits.split("train")
    gen = torch.Generator().manual_seed(r.seed + 1)
    torch.manual_seed(r.seed + 1)
    judge = Judge().to(dev)
    opt = torch.optim.Adam(judge.parameters(), lr=r.lr)
    batches = _batches(len(x_train), r.batch, gen)
    with _bar(r.judge_steps, "judge", progress) as bar:
        for step in range(r.judge_steps):
            _cosine_lr(opt, r.lr, step, r.judge_steps)
            idx = next(batches)
            loss = F.cross_entropy(judge(data.augment(x_train[idx], gen).to(dev)), y_train[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
    judge.eval()
    x_test, y_test = digits.split("test")
    with torch.no_grad():
        acc = float((judge(x_test.to(dev)).argmax(-1).cpu() == y_test).double().mean())
    return judge, {"test_accuracy": acc, "test_images": len(y_test)}


def train_ar(
    digits: data.Digits,
    vq: VQVAE,
    config: LlamaConfig,
    layout: Layout,
    r: ImageRecipe,
    steps: int,
    dev: torch.device,
    progress: bool,
    desc: str,
) -> tuple[TrainLlama, dict]:
    """Next-code prediction over [class token, codes]; the class token is replaced by the null
    class with probability r.class_dropout (what classifier-free guidance needs). Each step
    tokenizes freshly augmented images, so the model never sees the same grid twice."""
    x_train, y_train = digits.split("train")
    gen = torch.Generator().manual_seed(r.seed + 2)
    torch.manual_seed(r.seed + 2)
    model = TrainLlama(config).to(dev)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=0.01)
    codes = torch.arange(layout.codebook_size, device=dev)
    batches = _batches(len(x_train), r.batch, gen)
    with _bar(steps, desc, progress) as bar:
        for step in range(steps):
            _cosine_lr(opt, r.lr, step, steps)
            idx = next(batches)
            with torch.no_grad():
                ids = vq.encode(data.augment(x_train[idx], gen).to(dev))  # [B, 64]
            cls = y_train[idx].to(dev) + layout.codebook_size
            drop = torch.rand(len(idx), generator=gen).to(dev) < r.class_dropout
            cls = torch.where(drop, torch.full_like(cls, layout.null_class), cls)
            seq = torch.cat([cls[:, None], ids], 1)  # [B, 65]
            logits = model.logits(model(seq[:, :-1]), codes)  # [B, 64, K]: codes only
            loss = F.cross_entropy(logits.reshape(-1, layout.codebook_size), seq[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.update()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model, {"final_train_loss": loss.item(), "val_nll": ar_val_nll(model, digits, vq, layout, dev)}


@torch.no_grad()
def ar_val_nll(model: TrainLlama, digits: data.Digits, vq: VQVAE, layout: Layout, dev) -> float:
    """Mean negative log-likelihood per code on the validation split (class-conditioned)."""
    x, y = digits.split("val")
    ids = vq.encode(x.to(dev))
    seq = torch.cat([(y.to(dev) + layout.codebook_size)[:, None], ids], 1)
    logits = model.logits(model(seq[:, :-1]), torch.arange(layout.codebook_size, device=dev))
    return float(F.cross_entropy(logits.reshape(-1, layout.codebook_size), seq[:, 1:].reshape(-1)))


def train_image(
    out_dir: Path,
    recipe: ImageRecipe,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the four phases and write the model directory (see services.image.store)."""
    dev = torch.device(device)
    started = time.time()
    digits = data.load(recipe.seed)
    layout = recipe.layout()
    vq, vq_rep = train_vq(digits, recipe, dev, progress)
    log(f"vq: test mse {vq_rep['test_mse']:.4f}, {vq_rep['codes_used']}/{vq_rep['codebook_size']} codes used")
    judge, judge_rep = train_judge(digits, recipe, dev, progress)
    log(f"judge: test accuracy {judge_rep['test_accuracy']:.3f}")
    target_cfg = recipe.ar_config(recipe.target_hidden, recipe.target_layers)
    draft_cfg = recipe.ar_config(recipe.draft_hidden, recipe.draft_layers)
    target, target_rep = train_ar(
        digits, vq, target_cfg, layout, recipe, recipe.ar_steps, dev, progress, "ar"
    )
    log(f"ar: val nll {target_rep['val_nll']:.3f} per code")
    draft, draft_rep = train_ar(
        digits, vq, draft_cfg, layout, recipe, recipe.draft_steps, dev, progress, "draft"
    )
    log(f"draft: val nll {draft_rep['val_nll']:.3f} per code")
    report = {
        "recipe": recipe.to_dict(),
        "device": str(dev),
        "data": data.manifest(digits, recipe.seed),
        "vq": vq_rep,
        "judge": judge_rep,
        "ar": target_rep,
        "draft": draft_rep,
        "minutes": (time.time() - started) / 60,
        "source": "specmesh train image",
    }
    save_image_models(out_dir, layout, vq, judge, (target_cfg, target), (draft_cfg, draft), report)
    log(json.dumps({k: report[k] for k in ("vq", "judge", "ar", "draft", "minutes")}))
    return out_dir
