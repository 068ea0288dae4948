"""Perplexity of the target under H2O KV budgets (services.core.h2o) on real texts.

Each text is cut to its first `tokens` tokens (plain tokenization, no chat template) and
scored teacher-forced one token a step, with the full cache and with budgets of 50%, 20% and
10% of its length under two rules (services.core.h2o.H2OPolicy): the one the target serves
(`KVBudget`'s defaults: age-normalised scores, a 75% recent window) and the paper's (summed
scores, half heavy hitters, half recent window); everything is batched in one forward per step.
Reports perplexity per budget over all texts and `ppl_rel_increase` = ppl(budget) /
ppl(full) - 1, the full cache of the same run being the baseline: `budgets` for the served
rule, `paper_budgets` for the paper's.
"""

from __future__ import annotations

import gzip
import json
import math
import sysconfig
import time
from pathlib import Path
from typing import Any

from bench.decode import machine_info

SCHEMA_VERSION = 1
BUDGETS = (1.0, 0.5, 0.2, 0.1)
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Real texts present on a plain Debian + CPython machine: prose and code (the benchmark prompt
# sources of bench/prompts; none of the texts reserved for independent evaluation).
DEFAULT_TEXTS = (
    Path("/usr/share/doc/zlib1g-dev/FAQ.gz"),
    Path("/usr/share/doc/xz-utils/faq.txt.gz"),
    STDLIB / "difflib.py",
    STDLIB / "textwrap.py",
)


def read_text(path: Path) -> str:
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8", errors="replace")


def run_h2o_bench(
    model: str,
    out: Path,
    texts: list[Path] | None = None,
    tokens: int = 1536,
    budgets: tuple[float, ...] = BUDGETS,
    threads: int | None = None,
    progress: bool = True,
    png: bool = True,
) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from services.core.engine import Engine
    from services.core.h2o import H2OPolicy, budget_nll
    from services.core.model_store import resolve_model
    from services.core.params import DEFAULT_RECENT_SHARE
    from services.core.tokenizer import Tokenizer

    if tokens < 16:
        raise ValueError(f"tokens must be >= 16, got {tokens}")
    if threads is not None:
        torch.set_num_threads(threads)
    model_dir = Path(resolve_model(model))
    engine = Engine.from_dir(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    paths = [p for p in (texts or DEFAULT_TEXTS) if p.is_file()]
    chosen = []
    for p in paths:
        ids = tokenizer.encode(read_text(p))
        if len(ids) >= tokens:
            chosen.append((p, ids[:tokens]))
    if not chosen:
        raise ValueError(f"no text of at least {tokens} tokens among {[str(p) for p in paths]}")
    sizes = [None if f >= 1.0 else max(2, round(f * tokens)) for f in budgets]
    rules = {  # name -> the policy at each budget (None: the full cache, shared by both)
        "served": [None if k is None else H2OPolicy.of(k, DEFAULT_RECENT_SHARE) for k in sizes],
        "paper": [None if k is None else H2OPolicy.of(k, 0.5, age_normalised=False) for k in sizes],
    }
    # one batch: row 0 the full cache (every rule's baseline), then each rule's bounded budgets
    batch: list[H2OPolicy | None] = [None]
    rows: dict[str, list[int]] = {name: [] for name in rules}
    for name, rule in rules.items():
        for policy in rule:
            if policy is not None:
                batch.append(policy)
            rows[name].append(0 if policy is None else len(batch) - 1)
    started = time.perf_counter()
    per_text = []
    total = torch.zeros(len(batch))
    bar = tqdm(total=len(chosen) * (tokens - 1), desc="h2o", unit="tok", disable=not progress)
    for p, ids in chosen:
        nll = budget_nll(engine.model, ids, batch, on_step=lambda: bar.update(1))  # [batch, tokens - 1]
        total += nll.sum(-1)
        per_text.append(
            {
                "text": str(p),
                "tokens": len(ids),
                **{
                    key: {
                        _key(f): math.exp(float(nll[i].mean()))
                        for f, i in zip(budgets, rows[name], strict=True)
                    }
                    for name, key in (("served", "ppl"), ("paper", "paper_ppl"))
                },
            }
        )
    bar.close()
    n = len(chosen) * (tokens - 1)

    full = math.exp(float(total[0]) / n)

    def summary(name: str) -> dict[str, dict[str, Any]]:
        out = {}
        for f, k, i in zip(budgets, sizes, rows[name], strict=True):
            ppl = math.exp(float(total[i]) / n)
            out[_key(f)] = {
                "budget_fraction": f,
                "budget_tokens": k if k is not None else tokens,
                "ppl": ppl,
                "ppl_rel_increase": ppl / full - 1,
            }
        return out

    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "h2o",
        "config": {
            "model": engine.name,
            "weights_digest": engine.digest,
            "tokens_per_text": tokens,
            "policy": "H2O (arXiv 2306.14048): a recent window + heavy hitters by accumulated attention, "
            "per layer and KV head, one eviction per step",
            "served": {"recent_share": DEFAULT_RECENT_SHARE, "scores": "accumulated attention / key age"},
            "paper": {"recent_share": 0.5, "scores": "accumulated attention"},
        },
        "machine": machine_info(torch.get_num_threads()),
        "budgets": summary("served"),
        "paper_budgets": summary("paper"),
        "per_text": per_text,
        "seconds": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    result["json"] = str(out)
    result["png"], result["png_note"] = (None, None)
    if png:
        result["png_note"] = _write_png(result, out.with_suffix(".png"))
        result["png"] = None if result["png_note"] else str(out.with_suffix(".png"))
    return result


def _key(fraction: float) -> str:
    return f"{round(fraction * 100)}%"


def _write_png(result: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; PNG skipped"
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("budgets", "served (age-normalised, 75% recent)"),
        ("paper_budgets", "paper (sum, 50% recent)"),
    ):
        rows = sorted(result[key].values(), key=lambda r: r["budget_fraction"])
        ax.plot([100 * r["budget_fraction"] for r in rows], [r["ppl"] for r in rows], marker="o", label=label)
        for r in rows:
            if r["budget_fraction"] < 1.0:
                ax.annotate(f"+{100 * r['ppl_rel_increase']:.1f}%", (100 * r["budget_fraction"], r["ppl"]),
                            textcoords="offset points", xytext=(4, 6), fontsize=8)  # fmt: skip
    ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("KV budget (% of the text's tokens)")
    ax.set_ylabel("perplexity")
    cfg = result["config"]
    ax.set_title(
        f"{cfg['model']}: H2O budget, {len(result['per_text'])} texts x {cfg['tokens_per_text']} tokens"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def format_summary(result: dict[str, Any]) -> str:
    lines = [f"{'budget':>8} {'tokens':>7} {'ppl':>9} {'rel. increase':>14} {'paper rule':>11}"]
    for key, r in result["budgets"].items():
        paper = result["paper_budgets"][key]
        if r["budget_fraction"] >= 1.0:
            inc, paper_inc = "baseline", ""
        else:
            inc, paper_inc = (
                f"{100 * r['ppl_rel_increase']:+.2f}%",
                f"{100 * paper['ppl_rel_increase']:+.2f}%",
            )
        lines.append(f"{key:>8} {r['budget_tokens']:>7} {r['ppl']:>9.3f} {inc:>14} {paper_inc:>11}")
    lines.append(
        f"{len(result['per_text'])} texts, {result['seconds']:.0f} s, CPU {result['machine']['cpu_model']}"
    )
    return "\n".join(lines)
