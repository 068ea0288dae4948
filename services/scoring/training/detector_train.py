"""`specmesh train detector`: the learned (PAWN-style) detector the scoring service serves.

Steps: build the data set when missing (services.scoring.training.detector_data); score every
text with the scored model exactly as the service does (services.core.scoring.runner, with
hidden states); train services.core.scoring.pawn.PawnNet with a binary cross-entropy (AdamW,
minibatches of texts, the epoch with the best validation AUROC kept); report AUROC and
TPR at 1% FPR on every split, with the zero-shot log-likelihood and Fast-DetectGPT scores
beside it for scale; write detector.onnx / .safetensors / .json
(services.scoring.detector).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from services.core.engine import Engine
from services.core.model_store import model_root, resolve_model
from services.core.scoring import detection
from services.core.scoring.pawn import FEATURE_NAMES, PawnNet, token_inputs
from services.core.scoring.roc import auroc, tpr_at_fpr
from services.core.scoring.runner import Text, score_texts
from services.core.tokenizer import Tokenizer
from services.scoring.convert import start_token_id
from services.scoring.detector import (
    CONFIG_FILE,
    FORMAT,
    INPUT_NAMES,
    ONNX_FILE,
    OUTPUT_NAME,
    WEIGHTS_FILE,
    default_detector_dir,
    model_identity,
    onnx_scorer,
)
from services.scoring.training import detector_data
from services.scoring.training.detector_data import read_jsonl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    width: int = 32
    epochs: int = 40
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0


@dataclass
class Scored:
    """One split's texts as the detector sees them."""

    features: list[torch.Tensor]  # per text [n, F]
    hidden: list[torch.Tensor]  # per text [n, H]
    labels: np.ndarray  # [N] 1 = machine
    baselines: dict[str, np.ndarray]  # zero-shot scores, higher = machine


def score_split(
    engine: Engine,
    tokenizer: Tokenizer,
    rows: list[dict],
    *,
    batch: int = 16,
    progress: Callable[[int], None] = lambda n: None,
) -> Scored:
    """Every text of a split through the scoring model (batched, as the service scores them)."""
    start = start_token_id(tokenizer)
    features, hidden, ll, fdg = [], [], [], []
    for b in range(0, len(rows), batch):
        texts = [Text(tokenizer.encode(r["text"]), hidden=True) for r in rows[b : b + batch]]
        for f in score_texts(engine, texts, start):
            features.append(token_inputs(f))
            hidden.append(f.hidden.to(torch.float16))  # half the memory; the net upcasts
            mask = torch.ones(1, len(f.logprob), dtype=torch.bool)
            lp = f.logprob[None]
            ll.append(float(detection.log_likelihood(lp, mask).value[0]))
            # as the service computes it (the scored model samples and scores)
            fdg.append(float(detection.fast_detectgpt(lp, -f.entropy[None], f.var[None], mask).value[0]))
        progress(len(texts))
    # both zero-shot scores are higher for machine text
    baselines = {"log_likelihood": np.array(ll), "fast_detectgpt": np.array(fdg)}
    return Scored(features, hidden, np.array([r["label"] for r in rows]), baselines)


def _collate(s: Scored, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(s.features[i]) for i in idx)
    F, H = s.features[idx[0]].shape[1], s.hidden[idx[0]].shape[1]
    x, h, m = torch.zeros(len(idx), n, F), torch.zeros(len(idx), n, H), torch.zeros(len(idx), n)
    for j, i in enumerate(idx):
        t = len(s.features[i])
        x[j, :t], h[j, :t], m[j, :t] = s.features[i], s.hidden[i].float(), 1.0
    return x, h, m


@torch.no_grad()
def predict(net: PawnNet, s: Scored, batch: int = 64) -> np.ndarray:
    net.eval()
    out = [
        net(*_collate(s, list(range(b, min(b + batch, len(s.labels))))))
        for b in range(0, len(s.labels), batch)
    ]
    return torch.cat(out).numpy()


def summary(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    pos, neg = scores[labels == 1], scores[labels == 0]
    point = tpr_at_fpr(pos, neg, 0.01)
    return {
        "auroc": round(auroc(pos, neg), 4),
        "tpr_at_1pct_fpr": round(point.tpr, 4),
        "fpr_achieved": round(point.fpr, 4),
    }


def train(
    train_set: Scored, val_set: Scored, hidden_size: int, cfg: TrainConfig
) -> tuple[PawnNet, list[dict]]:
    """The network at the epoch of best validation AUROC, and the per-epoch history."""
    torch.manual_seed(cfg.seed)
    net = PawnNet(hidden_size, width=cfg.width)
    stacked = torch.cat(train_set.features)
    net.set_standardisation(stacked.mean(0), stacked.std(0))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    labels = torch.tensor(train_set.labels, dtype=torch.float32)
    rng = np.random.default_rng(cfg.seed)
    best, best_state, history = -1.0, None, []
    for epoch in range(cfg.epochs):
        net.train()
        order = rng.permutation(len(labels))
        total = 0.0
        for b in range(0, len(order), cfg.batch):
            idx = order[b : b + cfg.batch].tolist()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                net(*_collate(train_set, idx)), labels[idx]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        val = summary(predict(net, val_set), val_set.labels)["auroc"]
        history.append({"epoch": epoch + 1, "train_loss": round(total / len(order), 4), "val_auroc": val})
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in net.state_dict().items()}
    assert best_state is not None
    net.load_state_dict(best_state)
    return net.eval(), history


def export_onnx(net: PawnNet, path: Path) -> None:
    """detector.onnx with dynamic batch and token dimensions."""
    example = (torch.zeros(2, 3, net.n_features), torch.zeros(2, 3, net.hidden_size), torch.ones(2, 3))
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    shapes = {name: {0: batch, 1: tokens} for name in INPUT_NAMES}
    # the exporter narrates its passes on stdout and warns about optional packages
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            torch.onnx.export(
                net.eval(),
                example,
                str(path),
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_shapes=shapes,
                dynamo=True,
                external_data=False,
            )
        finally:
            logging.getLogger("torch.onnx").setLevel(level)


def onnx_parity(net: PawnNet, onnx_path: Path, s: Scored, n: int = 16) -> float:
    """Largest |logit difference| between the ONNX file (onnxruntime) and torch on n texts."""
    score, _ = onnx_scorer(onnx_path)
    idx = list(range(min(n, len(s.labels))))
    x, h, m = _collate(s, idx)
    with torch.no_grad():
        want = net(x, h, m).numpy()
    return float(np.abs(score(x, h, m) - want).max())


def write_detector(out: Path, net: PawnNet, config: dict[str, Any], parity_set: Scored) -> dict[str, Any]:
    """detector.onnx, .safetensors and .json into `out`, replacing what was there once all are
    complete; the ONNX file must match torch within 1e-4 on real texts or nothing is written."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_onnx(net, tmp / ONNX_FILE)
    parity = onnx_parity(net, tmp / ONNX_FILE, parity_set)
    if parity > 1e-4:
        shutil.rmtree(tmp)
        raise RuntimeError(f"detector.onnx differs from torch by {parity:.2e} (> 1e-4): not written")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / WEIGHTS_FILE)
    meta = {"format": FORMAT, "output": f"{OUTPUT_NAME}: sigmoid = P(machine-written)"} | config
    meta["onnx_torch_max_abs_diff"] = parity
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return meta


def run(
    model_dir: Path,
    engine: Engine,
    tokenizer: Tokenizer,
    data_dir: Path,
    data_manifest: dict,
    out: Path,
    cfg: TrainConfig,
    progress: Callable[[str, int], Callable[[int], None]],
) -> dict[str, Any]:
    """Score the splits, train, evaluate and write the detector; returns its detector.json."""
    began = time.monotonic()
    splits = {}
    for name in ("train", "val", "test", "test_unseen"):
        path = data_dir / f"{name}.jsonl"
        if path.is_file():
            rows = read_jsonl(path)
            splits[name] = score_split(
                engine, tokenizer, rows, progress=progress(f"scoring {name}", len(rows))
            )
    net, history = train(splits["train"], splits["val"], engine.config.hidden_size, cfg)
    report = {}
    for name, s in splits.items():
        report[name] = {"texts": int(len(s.labels)), "learned": summary(predict(net, s), s.labels)}
        for base, scores in s.baselines.items():
            report[name][base] = summary(scores, s.labels)
    config = model_identity(model_dir, engine) | {
        "width": cfg.width,
        "feature_names": list(FEATURE_NAMES),
        "train": asdict(cfg),
        "data": {"dir": str(data_dir), "manifest": data_manifest},
        "report": report,
        "history": history,
        "train_seconds": round(time.monotonic() - began, 1),
    }
    return write_detector(out, net, config, splits["val"])


def default_data_dir(model_dir: Path) -> Path:
    """Where the data set for a model's detector is kept: beside the model store."""
    return model_root().parent / "data" / f"detector-{Path(model_dir).name}"


def _bars(enabled: bool) -> Callable[[str, int], Callable[[int], None]]:
    """progress(description, total) -> advance(n): a tqdm bar per step."""

    def make(desc: str, total: int) -> Callable[[int], None]:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="text", disable=not enabled, dynamic_ncols=True)

        def advance(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return advance

    return make


def train_detector(
    model: str,
    *,
    out: Path | None = None,
    data_dir: Path | None = None,
    rebuild_data: bool = False,
    max_paragraphs: int | None = None,
    unseen_generator: str | None = "smollm2-135m-instruct-draft",
    cfg: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> Path:
    """Build the data set when missing (or asked), train, and write `<model dir>/detector/`
    (or `out`). Returns the detector directory."""
    from services.core.errors import NotFound

    model_dir = resolve_model(model)
    out = Path(out) if out is not None else default_detector_dir(model_dir)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    engine = Engine.from_dir(model_dir)
    engine.pack_weights()
    bars = _bars(progress)
    manifest = None if rebuild_data else detector_data.verify(data_dir)
    if manifest is None:
        paragraphs = detector_data.human_paragraphs()
        if max_paragraphs is not None:
            # evenly spaced, so a small set still spans packages (and every split)
            step = max(1, len(paragraphs) // max_paragraphs)
            paragraphs = paragraphs[::step][:max_paragraphs]
        unseen = None
        if unseen_generator:
            try:
                unseen = Engine.from_dir(resolve_model(unseen_generator))
            except NotFound:
                log.warning("unseen generator %s not found: no test_unseen split", unseen_generator)
        config = detector_data.DataConfig(
            model_dir.name, unseen_generator if unseen else None, max_paragraphs
        )
        total = len(paragraphs) + (
            sum(detector_data.split_of(p.document) == "test" for p in paragraphs) if unseen else 0
        )
        manifest = detector_data.build(
            data_dir, config, engine, tokenizer, unseen, paragraphs, bars("generating", total)
        )
    detector_data.write_bench_views(data_dir)
    run(model_dir, engine, tokenizer, data_dir, manifest, out, cfg, bars)
    return out
