"""Runner of `specmesh bench image`.

Batches of images rotate through the methods (each batch decodes the same classes with the same
seed under every method, in a rotating order) so load changes on a shared machine hit every
method alike. Quality: the judge's class accuracy (with a 95% normal-approximation interval)
and the Frechet distance of its features to the held-out real test digits; a real-vs-real
distance (validation vs test split) is reported as the floor.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bench.decode import machine_info
from bench.spec.provenance import git_info, loadavg
from services.core.engine import Engine
from services.core.image_decoding import ImageDecodeConfig, Method
from services.core.image_spec import GroupRule, cosine_distances
from services.core.params import SamplingConfig
from services.image import data, png
from services.image.generation import generate
from services.image.judge import frechet_distance
from services.image.store import ImageModels, load_image_models
from services.image.vq import nearest_codes


@dataclass(frozen=True)
class ImageBenchConfig:
    n: int = 256  # images per method
    # images per decode call: the latency regime speculative decoding is for (at 16 images, 2 CPU
    # cores are compute-bound and verifying 5 tokens costs about 3x one)
    batch: int = 4
    cfg_scale: float = 4.0
    temperature: float = 1.0
    draft_len: int = 4
    lantern_delta: float = 0.2
    lantern_k: int = 8
    gsd_group: int = 5
    sweep_deltas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
    sweep_n: int = 128  # images per delta in the trade-off sweep
    seed: int = 0
    model_dir: str | None = None
    threads: int = 1
    out: str = "image.json"
    progress: bool = True
    methods: tuple[str, ...] = field(default=("ar", "exact_sd", "lantern", "gsd"))


def _rule(method: Method, cfg: ImageBenchConfig, codebook: torch.Tensor, delta: float) -> GroupRule:
    if method is Method.LANTERN:
        return GroupRule("lantern", neighbours=nearest_codes(codebook, cfg.lantern_k), delta=delta)
    if method is Method.GSD:
        return GroupRule("gsd", cos_dist=cosine_distances(codebook), size=cfg.gsd_group)
    return GroupRule("exact")


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    acc = float((pred == labels).mean())
    half = 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / len(labels))
    return {"class_accuracy": acc, "class_accuracy_ci95": [max(0.0, acc - half), min(1.0, acc + half)]}


class _Run:
    """Images, timings and acceptance counts of one decoding setting, accumulated over batches."""

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []
        self.labels: list[int] = []
        self.seconds = 0.0
        self.emitted = self.forwards = self.drafted = self.accepted = 0

    def add(self, out, labels: list[int], seconds: float) -> None:
        self.images.append(out.images)
        self.labels += labels
        self.seconds += seconds
        s = out.stats
        self.forwards += s["rounds"]
        self.drafted += s["drafted_tokens"]
        self.accepted += s["accepted_tokens"]
        self.emitted += out.codes.numel()

    def report(self, models: ImageModels, real_features: np.ndarray) -> dict[str, Any]:
        images = torch.cat(self.images)
        features, pred = models.judge.features_and_labels(images)
        return {
            "images": len(images),
            "seconds": self.seconds,
            "images_per_s": len(images) / self.seconds,
            "mean_accepted_len": self.emitted / self.forwards,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            **_accuracy(pred, np.array(self.labels)),
            "frechet_distance": frechet_distance(features, real_features),
        }


def _decode_cfg(models: ImageModels, cfg: ImageBenchConfig, method: Method, delta: float, seed: int):
    L = models.layout
    return ImageDecodeConfig(
        codebook_size=L.codebook_size,
        tokens_per_image=L.tokens_per_image,
        null_class=L.null_class,
        method=method,
        sampling=SamplingConfig(temperature=cfg.temperature),
        cfg_scale=cfg.cfg_scale,
        seed=seed,
        draft_len=cfg.draft_len,
        rule=_rule(method, cfg, models.vq.codebook, delta),
    )


def _sweep(settings, models, target, draft, cfg: ImageBenchConfig, n: int, desc: str) -> dict[Any, _Run]:
    """settings: key -> (method, delta). Batches rotate through the settings."""
    runs = {key: _Run() for key in settings}
    keys = list(settings)
    batches = range(0, n, cfg.batch)
    with tqdm(total=len(batches) * len(keys), desc=desc, disable=not cfg.progress, dynamic_ncols=True) as bar:
        for b, start in enumerate(batches):
            labels = [(start + i) % 10 for i in range(min(cfg.batch, n - start))]
            classes = [models.layout.class_token(c) for c in labels]
            for key in keys[b % len(keys) :] + keys[: b % len(keys)]:
                method, delta = settings[key]
                dcfg = _decode_cfg(models, cfg, method, delta, cfg.seed + b)
                t0 = time.perf_counter()
                out = generate(models, target, draft, classes, dcfg)
                runs[key].add(out, labels, time.perf_counter() - t0)
                bar.update()
    return runs


def run(cfg: ImageBenchConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    load_start = loadavg()
    git_start = git_info()
    models = load_image_models(cfg.model_dir)
    target = Engine.from_dir(models.target_dir)
    draft = Engine.from_dir(models.draft_dir)
    digits = data.load(json.loads((models.dir / "train_report.json").read_text())["recipe"]["seed"])
    real_test, _ = digits.split("test")
    real_val, _ = digits.split("val")
    real_features, _ = models.judge.features_and_labels(real_test)
    val_features, _ = models.judge.features_and_labels(real_val)
    # warm-up: one small batch per method (allocations, first-call paths)
    warm = {m: (Method(m), cfg.lantern_delta) for m in cfg.methods}
    _sweep(warm, models, target, draft, ImageBenchConfig(**{**asdict(cfg), "batch": 4}), 4, "warm-up")

    runs = _sweep(warm, models, target, draft, cfg, cfg.n, "methods")
    results = {m: runs[m].report(models, real_features) for m in cfg.methods}
    ar = results.get("ar")
    for r in results.values():
        r["speedup_vs_ar"] = r["images_per_s"] / ar["images_per_s"] if ar else None
    sweep_settings = {d: (Method.LANTERN, d) for d in cfg.sweep_deltas} | {"ar": (Method.AR, 0.0)}
    sweep_runs = _sweep(sweep_settings, models, target, draft, cfg, cfg.sweep_n, "delta sweep")
    sweep_ar = sweep_runs.pop("ar").report(models, real_features)
    sweep = []
    for d, r in sweep_runs.items():
        rep = r.report(models, real_features)
        rep["delta"] = d
        rep["speedup_vs_ar"] = rep["images_per_s"] / sweep_ar["images_per_s"]
        sweep.append(rep)
    out_path = Path(cfg.out)
    report = {
        "benchmark": "image",
        "config": asdict(cfg),
        "model_dir": str(models.dir),
        "train_report": {
            k: json.loads((models.dir / "train_report.json").read_text())[k]
            for k in ("vq", "judge", "ar", "draft")
        },
        "real_vs_real_frechet_distance": frechet_distance(val_features, real_features),
        "methods": results,
        "lantern_delta_sweep": {"ar": sweep_ar, "points": sweep},
        "machine": machine_info(torch.get_num_threads())
        | {"loadavg_start": load_start, "loadavg_end": loadavg(), **git_start},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    for m, r in runs.items():
        grid = torch.cat(r.images)[:40]
        out_path.with_name(f"{out_path.stem}_{m}.png").write_bytes(png.grid_png(grid, cols=10, scale=2))
    _plot(report, out_path.with_name(f"{out_path.stem}_delta.png"))
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no trade-off plot")
        return
    pts = report["lantern_delta_sweep"]["points"]
    ar = report["lantern_delta_sweep"]["ar"]
    deltas = [p["delta"] for p in pts]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(deltas, [p["speedup_vs_ar"] for p in pts], "o-")
    axes[0].axhline(1.0, color="grey", ls="--", label="ar")
    axes[0].set_ylabel("speed-up vs AR")
    axes[1].plot(deltas, [p["class_accuracy"] for p in pts], "o-")
    axes[1].axhline(ar["class_accuracy"], color="grey", ls="--", label="ar")
    axes[1].set_ylabel("class accuracy")
    axes[2].plot(deltas, [p["frechet_distance"] for p in pts], "o-")
    axes[2].axhline(ar["frechet_distance"], color="grey", ls="--", label="ar")
    axes[2].set_ylabel("Frechet distance (judge features)")
    for ax in axes:
        ax.set_xlabel("LANTERN delta")
        ax.legend()
    cpu = report["machine"].get("cpu_model")
    fig.suptitle(f"LANTERN trade-off, {pts[0]['images']} images per point ({cpu})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def summary(report: dict[str, Any]) -> str:
    lines = [f"{'method':10} {'img/s':>7} {'speedup':>8} {'tau':>5} {'acc':>6} {'FD':>8}"]
    for m, r in report["methods"].items():
        lines.append(
            f"{m:10} {r['images_per_s']:7.2f} {r['speedup_vs_ar']:8.2f} {r['mean_accepted_len']:5.2f} "
            f"{r['class_accuracy']:6.3f} {r['frechet_distance']:8.3f}"
        )
    lines.append(f"real vs real FD: {report['real_vs_real_frechet_distance']:.3f}")
    lines.append(
        "LANTERN delta sweep: "
        + ", ".join(
            f"d={p['delta']}: {p['speedup_vs_ar']:.2f}x acc {p['class_accuracy']:.3f} "
            f"FD {p['frechet_distance']:.2f}"
            for p in report["lantern_delta_sweep"]["points"]
        )
    )
    return "\n".join(lines)
