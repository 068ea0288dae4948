"""`specmesh bench membership`: membership-inference scores on a model whose training data is
known exactly (`specmesh train membership`: a draft fine-tuned on members.jsonl, with
nonmembers.jsonl of the same corpus held out), through the real Membership RPC of a scoring
service process.

Every member and non-member text is scored by every membership method the service offers
(Min-K%, arXiv 2310.16789; Min-K%++, arXiv 2404.02936; DC-PDD, arXiv 2409.14781), plus the
plain loss baseline (mean log-likelihood, from Uncertainty's geometric mean probability; Yeom
et al. 2018's attack), on the fine-tuned model and, as the control, on the model it was
fine-tuned from, which saw neither side: there every AUROC should be near 0.5. Per method:
AUROC with members as the positive class and higher = member, TPR at 1% FPR, and a bootstrap
95% interval (texts resampled within each side, the same resamples for every method, so that
differences between methods are paired). DC-PDD's paper reports it beating Min-K% (on WikiMIA
and others, with pretrained models); ``dc_pdd_vs_min_k`` says whether it does here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.attribute import ScoringProcess
from bench.decode import machine_info
from bench.detect import load_texts, roc_points, tpr_at_fpr
from bench.spec.provenance import git_info, loadavg
from services.core.scoring import roc

MEMBERS_FILE = "members.jsonl"  # as services/draft/training/membership.py writes them
NONMEMBERS_FILE = "nonmembers.jsonl"
BOOTSTRAP = 2000
METHOD_ORDER = ("loss", "min_k", "min_k_plus_plus", "dc_pdd")


def score_text(stub, text: str, timeout: float) -> dict[str, float]:
    """Every membership score of one text (higher = member), and the loss baseline."""
    from specmesh.v1 import common_pb2, scoring_pb2

    prompt = common_pb2.Prompt(text=text)
    reply = stub.Membership(scoring_pb2.MembershipRequest(input=prompt), timeout=timeout)
    scores = {
        scoring_pb2.MembershipMethod.Name(s.method).removeprefix("MEMBERSHIP_METHOD_").lower(): s.score
        for s in reply.scores
    }
    uncertainty = stub.Uncertainty(scoring_pb2.UncertaintyRequest(input=prompt), timeout=timeout)
    # mean log p (higher = member); the floor keeps an underflowed geometric mean finite
    scores["loss"] = math.log(max(uncertainty.geometric_mean_prob, 1e-300))
    return scores


def score_all(
    stub, texts: Sequence[str], timeout: float, desc: str, progress: bool
) -> list[dict[str, float]]:
    from tqdm import tqdm

    return [score_text(stub, t, timeout) for t in tqdm(texts, desc=desc, unit="text", disable=not progress)]


def bootstrap_aurocs(
    members: Mapping[str, np.ndarray], nonmembers: Mapping[str, np.ndarray], n: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """AUROC of each method on n resamples (with replacement, within each side); resample i is
    the same texts for every method."""
    rng = np.random.default_rng(seed)
    n_pos, n_neg = len(next(iter(members.values()))), len(next(iter(nonmembers.values())))
    draws = [(rng.integers(0, n_pos, n_pos), rng.integers(0, n_neg, n_neg)) for _ in range(n)]
    return {m: np.array([roc.auroc(members[m][p], nonmembers[m][q]) for p, q in draws]) for m in members}


def interval(values: np.ndarray) -> list[float]:
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def summarise(
    members: Sequence[Mapping[str, float]], nonmembers: Sequence[Mapping[str, float]], bootstrap: int
) -> dict[str, Any]:
    """Per method: AUROC (members positive), its bootstrap interval, TPR at 1% FPR, means; each
    method's AUROC minus Min-K%'s with a paired interval; and the DC-PDD verdict."""
    methods = [m for m in METHOD_ORDER if m in members[0]] + sorted(set(members[0]) - set(METHOD_ORDER))
    pos = {m: np.array([s[m] for s in members]) for m in methods}
    neg = {m: np.array([s[m] for s in nonmembers]) for m in methods}
    boot = bootstrap_aurocs(pos, neg, bootstrap)
    out: dict[str, Any] = {"methods": {}}
    for m in methods:
        at = tpr_at_fpr(pos[m], neg[m])
        out["methods"][m] = {
            "auroc": roc.auroc(pos[m], neg[m]),
            "auroc_95ci": interval(boot[m]),
            "tpr_at_1pct_fpr": at["tpr"],
            "fpr": at["fpr"],
            "mean_score": {"members": float(pos[m].mean()), "nonmembers": float(neg[m].mean())},
        }
    if "min_k" in methods:
        out["vs_min_k"] = {
            m: {
                "auroc_difference": out["methods"][m]["auroc"] - out["methods"]["min_k"]["auroc"],
                "difference_95ci": interval(boot[m] - boot["min_k"]),
            }
            for m in methods
            if m != "min_k"
        }
    if "dc_pdd" in methods and "min_k" in methods:
        d = out["vs_min_k"]["dc_pdd"]
        lo, hi = d["difference_95ci"]
        verdict = (
            "DC-PDD beats Min-K%"
            if lo > 0
            else "Min-K% beats DC-PDD"
            if hi < 0
            else "no significant difference"
        )
        out["dc_pdd_vs_min_k"] = d | {"verdict": verdict}
    return out


def write_png(result: dict[str, Any], scores: Mapping[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    fig, axes = plt.subplots(1, len(scores), figsize=(5.5 * len(scores), 4.5), squeeze=False)
    for ax, (which, s) in zip(axes[0], scores.items(), strict=True):
        for m, r in result[which]["methods"].items():
            fpr, tpr = roc_points([x[m] for x in s["members"]], [x[m] for x in s["nonmembers"]])
            ax.plot(fpr, tpr, label=f"{m} (AUROC {r['auroc']:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_title(f"{which}: {result['config'][which + '_model']}", fontsize=9)
        ax.set_xlabel("false positive rate (non-members flagged)")
        ax.set_ylabel("true positive rate (members flagged)")
        ax.legend(fontsize=8, loc="lower right")
    c = result["config"]
    fig.suptitle(
        f"membership inference: {c['members']} members / {c['nonmembers']} non-members "
        f"({result['machine'].get('cpu_model', '?')})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def run_membership_bench(
    model_dir: Path,
    *,
    out: Path,
    base: str | None = None,
    limit: int | None = None,
    threads: int | None = None,
    timeout: float = 600.0,
    bootstrap: int = BOOTSTRAP,
    png: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Score model_dir's members and non-members on the fine-tuned model and on `base` (default:
    the base its train_report.json names; "none" = no control); write JSON (+ PNG)."""
    import grpc

    from specmesh.v1 import scoring_pb2_grpc

    started, load_start, git = time.time(), loadavg(), git_info()
    members = load_texts(model_dir / MEMBERS_FILE, limit)
    nonmembers = load_texts(model_dir / NONMEMBERS_FILE, limit)
    report = json.loads((model_dir / "train_report.json").read_text())
    if base is None:
        base = report.get("base")
    models = {"finetuned": str(model_dir)} | ({"base": base} if base and base != "none" else {})
    out.parent.mkdir(parents=True, exist_ok=True)
    scores: dict[str, dict[str, list[dict[str, float]]]] = {}
    for which, model in models.items():
        log = out.with_suffix(f".{which}.service.log")
        with ScoringProcess(model, threads, log) as proc, grpc.insecure_channel(proc.address) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            scores[which] = {
                "members": score_all(stub, members, timeout, f"{which}: members", progress),
                "nonmembers": score_all(stub, nonmembers, timeout, f"{which}: non-members", progress),
            }
    result: dict[str, Any] = {
        "benchmark": "membership",
        "config": {
            "model_dir": str(model_dir),
            "members": len(members),
            "nonmembers": len(nonmembers),
            "limit": limit,
            "finetuned_model": str(model_dir),
            "base_model": base,
            "service_threads": threads,
            "bootstrap": bootstrap,
            "positive_class": "members",
            "k_fraction": "service default (0.2)",
        },
        "train_report": report,
    }
    for which, s in scores.items():
        result[which] = summarise(s["members"], s["nonmembers"], bootstrap)
    result["machine"] = machine_info(threads or 0) | {
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        **git,
    }
    result["wall_s"] = time.time() - started
    result["scores"] = scores
    out.write_text(json.dumps(result, indent=1) + "\n")
    result["json"] = str(out)
    result["png_note"] = write_png(result, scores, out.with_suffix(".png")) if png else "--no-png"
    result["png"] = None if result["png_note"] else str(out.with_suffix(".png"))
    return result


def format_summary(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [f"bench membership: {c['members']} members / {c['nonmembers']} non-members of {c['model_dir']}"]
    for which in ("finetuned", "base"):
        if which not in r:
            continue
        lines.append(f"{which} ({c[which + '_model']}):")
        lines.append(f"  {'method':<16} {'AUROC':>6} {'95% CI':>15} {'TPR@1%FPR':>10}")
        for m, s in r[which]["methods"].items():
            ci = "[{:.3f}, {:.3f}]".format(*s["auroc_95ci"])
            lines.append(f"  {m:<16} {s['auroc']:>6.3f} {ci:>15} {s['tpr_at_1pct_fpr']:>10.3f}")
        for m, d in r[which].get("vs_min_k", {}).items():
            lo, hi = d["difference_95ci"]
            verdict = f": {r[which]['dc_pdd_vs_min_k']['verdict']}" if m == "dc_pdd" else ""
            lines.append(f"  {m} - min_k: AUROC {d['auroc_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]{verdict}")
    m = r["machine"]
    lines.append(f"machine: {m.get('cpu_model')}, load {m.get('loadavg_start')} -> {m.get('loadavg_end')}")
    return "\n".join(lines)
