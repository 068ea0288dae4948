"""`specmesh bench detect`: the scoring service's machine-text detectors on a human and a machine
text set, through the real Detect RPC of a scoring service process.

Every text is scored once by every method the service offers (the request names none), one call
at a time; a method's key is its enum name without ``DETECT_METHOD_`` in lower case, except PAWN,
the learned detector, keyed ``learned`` (absent when the service does not answer it). Scores are
oriented with the reply's ``higher_means_machine`` so that higher = machine, then per method:

- ``auroc``: machine texts are the positive class; the Mann-Whitney U statistic over the pooled
  midranks (a tie between a machine and a human text counts one half), U / (n_machine n_human).
- ``tpr_at_1pct_fpr``: the share of machine texts strictly above the lowest threshold that at
  most 1% of the human texts exceed (the k+1-th highest human score, k = floor(1% n_human)).
  With fewer than 100 human texts k = 0: the threshold is the highest human score and the
  achieved FPR (``fpr``, always reported) is 0, not 1%.

Throughput: the same texts again with 16 Detect calls in flight (a thread pool on one channel),
so that the service's batcher can put concurrent texts in one forward; reported as texts/s and
tokens/s of each pass and their ratio, with the largest score difference between the passes
(batched and single forwards agree up to float rounding). Seconds are the client's wall time on
the machine in ``machine`` (CPU model, load), not comparable across machines.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.attribute import ScoringProcess
from bench.decode import machine_info
from bench.spec.provenance import git_info, loadavg
from services.core.scoring import roc

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_OBSERVER = "smollm2-135m-instruct-draft"
CONCURRENCY = 16
MAX_FPR = 0.01
# canonical order of the methods in the JSON, the table and the plot (others follow, sorted)
METHOD_ORDER = ("log_likelihood", "log_rank", "entropy", "binoculars", "fast_detectgpt", "learned")

# Published figures for scale: other models, other data, other generators than these texts.
PUBLISHED: dict[str, dict[str, Any]] = {
    "binoculars": {
        "citation": "Hans et al., Spotting LLMs With Binoculars: Zero-Shot Detection of Machine-Generated "
        "Text, arXiv 2401.12070 (ICML 2024)",
        "auroc": None,
        "note": "no AUROC figure of the paper's own was found with the search tool; its abstract reports "
        "over 90% of ChatGPT (and other LLMs') samples detected at 0.01% FPR, with Falcon-7B as "
        "observer and Falcon-7B-instruct as performer",
    },
    "fast_detectgpt": {
        "citation": "Bao et al., Fast-DetectGPT: Efficient Zero-Shot Detection of Machine-Generated Text "
        "via Conditional Probability Curvature, arXiv 2310.05130 (v3, Table 1)",
        "auroc": 0.9887,
        "note": "mean AUROC on the generations of 5 source models; 0.9338 on ChatGPT/GPT-4 generations",
    },
}


# --- inputs ------------------------------------------------------------------------------------


def load_texts(path: Path, limit: int | None = None) -> list[str]:
    """The ``text`` of every ``{"text": ...}`` line of `path` (blank lines skipped), the first
    `limit` when given; ValueError naming the line for anything else."""
    texts: list[str] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
                raise ValueError(f'{path}:{n}: expected {{"text": "..."}} with a non-empty string')
            texts.append(row["text"])
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def method_key(enum_name: str) -> str:
    """DETECT_METHOD_LOG_RANK -> log_rank; DETECT_METHOD_PAWN (the learned detector) -> learned."""
    key = enum_name.removeprefix("DETECT_METHOD_").lower()
    return "learned" if key == "pawn" else key


def ordered(methods: Iterable[str]) -> list[str]:
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(set(methods) - set(METHOD_ORDER))


# --- metrics (pure) ----------------------------------------------------------------------------


def orient(score: float, higher_means_machine: bool) -> float:
    """The score with higher = machine."""
    return score if higher_means_machine else -score


def auroc(machine: Sequence[float], human: Sequence[float]) -> float | None:
    """P(machine score > human score) + P(tie) / 2 (services.core.scoring.roc); None when either
    side is empty."""
    return roc.auroc(machine, human) if len(machine) and len(human) else None


def tpr_at_fpr(machine: Sequence[float], human: Sequence[float], max_fpr: float = MAX_FPR) -> dict[str, Any]:
    """The operating point of services.core.scoring.roc.tpr_at_fpr as a dict (None fields when
    either side is empty)."""
    if not len(machine) or not len(human):
        return {"tpr": None, "fpr": None, "threshold": None, "allowed_false_positives": None}
    return asdict(roc.tpr_at_fpr(machine, human, max_fpr))


def roc_points(machine: Sequence[float], human: Sequence[float]) -> tuple[list[float], list[float]]:
    """(FPR, TPR) of "score >= t" for t over every distinct score, highest first, from (0, 0)
    to (1, 1); tied machine and human scores make one diagonal step."""
    pooled = sorted([(s, True) for s in machine] + [(s, False) for s in human], key=lambda x: -x[0])
    fpr, tpr = [0.0], [0.0]
    tp = fp = i = 0
    while i < len(pooled):
        j = i
        while j < len(pooled) and pooled[j][0] == pooled[i][0]:
            tp += pooled[j][1]
            fp += not pooled[j][1]
            j += 1
        fpr.append(fp / len(human))
        tpr.append(tp / len(machine))
        i = j
    return fpr, tpr


def method_result(records: Sequence[Mapping[str, Any]], method: str) -> dict[str, Any]:
    """AUROC, TPR at 1% FPR and counts of one method over the records that carry it."""
    rows = [r for r in records if method in r["scores"]]
    directions = {r["higher_means_machine"][method] for r in rows}
    if len(directions) != 1:
        raise ValueError(f"{method}: the replies disagree on higher_means_machine ({sorted(directions)})")
    higher = directions.pop()
    by_label: dict[str, list[float]] = {"human": [], "machine": []}
    non_finite = 0
    for r in rows:
        s = r["scores"][method]
        if math.isfinite(s):
            by_label[r["label"]].append(orient(s, higher))
        else:
            non_finite += 1
    machine, human = by_label["machine"], by_label["human"]
    at = tpr_at_fpr(machine, human)
    out: dict[str, Any] = {
        "higher_means_machine": higher,
        "auroc": auroc(machine, human),
        "tpr_at_1pct_fpr": at["tpr"],
        "fpr": at["fpr"],
        "threshold_oriented": at["threshold"],
        "human_texts": len(human),
        "machine_texts": len(machine),
        "non_finite_scores": non_finite,
        "mean_oriented_score": {k: (sum(v) / len(v) if v else None) for k, v in by_label.items()},
    }
    if len(human) < round(1 / MAX_FPR):
        out["fpr_note"] = (
            f"fewer than {round(1 / MAX_FPR)} human texts: no threshold lets exactly 1% of them through; "
            f"the threshold is the highest human score and the achieved FPR is {at['fpr']}"
        )
    if method in PUBLISHED:
        out["published"] = PUBLISHED[method]
    return out


def summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method (every method any record carries, in METHOD_ORDER) its method_result."""
    methods = ordered({m for r in records for m in r["scores"]})
    return {m: method_result(records, m) for m in methods}


def throughput(sequential: Mapping[str, float], concurrent: Mapping[str, float]) -> dict[str, Any]:
    """texts/s and tokens/s of both passes (each a dict of texts, tokens, wall_s) and the ratio."""

    def rates(p: Mapping[str, float]) -> dict[str, float]:
        return p | {"texts_per_s": p["texts"] / p["wall_s"], "tokens_per_s": p["tokens"] / p["wall_s"]}

    seq, conc = rates(sequential), rates(concurrent)
    return {
        "sequential": seq,
        f"concurrent_{CONCURRENCY}": conc,
        "concurrency": CONCURRENCY,
        "ratio_concurrent_vs_sequential": conc["texts_per_s"] / seq["texts_per_s"],
    }


# --- the service -------------------------------------------------------------------------------


def detect_once(stub, text: str, timeout: float) -> dict[str, Any]:
    """One Detect call with every available method: scores and directions by method key."""
    from specmesh.v1 import common_pb2, scoring_pb2

    request = scoring_pb2.DetectRequest(input=common_pb2.Prompt(text=text))
    t0 = time.perf_counter()
    reply = stub.Detect(request, timeout=timeout)
    wall = time.perf_counter() - t0
    names = {s.method: method_key(scoring_pb2.DetectMethod.Name(s.method)) for s in reply.scores}
    return {
        "tokens": len(reply.token_ids),
        "scores": {names[s.method]: s.score for s in reply.scores},
        "higher_means_machine": {names[s.method]: s.higher_means_machine for s in reply.scores},
        "wall_s": wall,
        "service_s": reply.timing.total_ns / 1e9,
    }


def score_sequential(
    stub, items: Sequence[tuple[str, int, str]], timeout: float, progress: bool
) -> tuple[list[dict[str, Any]], float]:
    from tqdm import tqdm

    records = []
    t0 = time.perf_counter()
    for label, index, text in tqdm(
        items, unit="text", desc="sequential", disable=not progress, dynamic_ncols=True
    ):
        records.append({"label": label, "index": index} | detect_once(stub, text, timeout))
    return records, time.perf_counter() - t0


def score_concurrent(
    stub, items: Sequence[tuple[str, int, str]], timeout: float, progress: bool
) -> tuple[list[dict[str, Any]], float]:
    from tqdm import tqdm

    t0 = time.perf_counter()
    with (
        ThreadPoolExecutor(CONCURRENCY) as pool,
        tqdm(total=len(items), unit="text", desc=f"{CONCURRENCY} in flight", disable=not progress) as bar,
    ):
        futures = [pool.submit(detect_once, stub, text, timeout) for _, _, text in items]
        for f in futures:
            f.add_done_callback(lambda _: bar.update())
        rows = [f.result() for f in futures]
    return rows, time.perf_counter() - t0


def max_score_diff(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> float:
    """The largest |score difference| of one text and method between two passes."""
    diffs = [
        abs(x["scores"][m] - y["scores"][m])
        for x, y in zip(a, b, strict=True)
        for m in x["scores"]
        if math.isfinite(x["scores"][m]) and math.isfinite(y["scores"].get(m, math.nan))
    ]
    return max(diffs, default=0.0)


def write_png(result: dict[str, Any], records: Sequence[Mapping[str, Any]], path: Path) -> str | None:
    """ROC curves per method (linear and log FPR); None, or a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    fig, (lin, log) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method, r in result["methods"].items():
        oriented = {"human": [], "machine": []}
        for rec in records:
            s = rec["scores"].get(method)
            if s is not None and math.isfinite(s):
                oriented[rec["label"]].append(orient(s, r["higher_means_machine"]))
        if not oriented["human"] or not oriented["machine"]:
            continue
        fpr, tpr = roc_points(oriented["machine"], oriented["human"])
        label = f"{method} (AUROC {r['auroc']:.3f})"
        lin.plot(fpr, tpr, label=label, drawstyle="default")
        floor = 0.5 / len(oriented["human"])  # FPR 0 drawn at half a human text
        log.plot([max(x, floor) for x in fpr], tpr, label=label)
    lin.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    lin.set_xlabel("false positive rate (human texts flagged)")
    lin.set_ylabel("true positive rate (machine texts flagged)")
    lin.legend(fontsize=8, loc="lower right")
    log.set_xscale("log")
    log.axvline(MAX_FPR, color="grey", lw=0.8, ls=":")
    log.set_xlabel("false positive rate, log scale (dotted: 1%)")
    log.set_ylabel("true positive rate")
    c = result["config"]
    fig.suptitle(
        f"machine-text detection: {c['human_count']} human / {c['machine_count']} machine texts, "
        f"{c['address'] or c['model']} ({result['machine'].get('cpu_model', '?')})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def run_detect_bench(
    human_file: Path,
    machine_file: Path,
    *,
    out: Path,
    limit: int | None = None,
    model: str = DEFAULT_MODEL,
    observer: str | None = DEFAULT_OBSERVER,
    threads: int | None = None,
    timeout: float = 600.0,
    address: str | None = None,
    png: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Score both files through a scoring service (started here on `model` / `observer`, or the
    one at `address`) and write the JSON (+ PNG next to it); the result, with ``json``/``png``."""
    import contextlib

    import grpc

    from specmesh.v1 import scoring_pb2_grpc

    out.parent.mkdir(parents=True, exist_ok=True)
    started, load_start, git = time.time(), loadavg(), git_info()
    human, machine = load_texts(human_file, limit), load_texts(machine_file, limit)
    items = [("human", i, t) for i, t in enumerate(human)] + [
        ("machine", i, t) for i, t in enumerate(machine)
    ]
    service = (
        contextlib.nullcontext(None)
        if address
        else ScoringProcess(model, threads, out.with_suffix(".service.log"), observer=observer)
    )
    with service as proc, grpc.insecure_channel(address or proc.address) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        detect_once(stub, items[0][2], timeout)  # warm-up, not timed
        records, seq_wall = score_sequential(stub, items, timeout, progress)
        concurrent, conc_wall = score_concurrent(stub, items, timeout, progress)
    tokens = sum(r["tokens"] for r in records)
    result: dict[str, Any] = {
        "benchmark": "detect",
        "config": {
            "human": str(human_file),
            "machine": str(machine_file),
            "limit": limit,
            "human_count": len(human),
            "machine_count": len(machine),
            "model": model if not address else None,
            "observer": observer if not address else None,
            "address": address,
            "service_threads": threads,
            "max_fpr": MAX_FPR,
            "concurrency": CONCURRENCY,
            "positive_class": "machine",
        },
        "methods": summarise(records),
        "throughput": throughput(
            {"texts": len(records), "tokens": tokens, "wall_s": seq_wall},
            {"texts": len(concurrent), "tokens": tokens, "wall_s": conc_wall},
        )
        | {"max_abs_score_diff_concurrent_vs_sequential": max_score_diff(records, concurrent)},
        "tokens_mean": tokens / len(records),
        "machine": machine_info(threads or 0)
        | {"loadavg_start": load_start, "loadavg_end": loadavg(), **git},
        "wall_s": time.time() - started,
        "records": records,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    result["json"] = str(out)
    result["png_note"] = write_png(result, records, out.with_suffix(".png")) if png else "--no-png"
    result["png"] = None if result["png_note"] else str(out.with_suffix(".png"))
    return result


def format_summary(r: dict[str, Any]) -> str:
    def f(x: float | None, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    c = r["config"]
    where = c["address"] or f"{c['model']}" + (f", observer {c['observer']}" if c["observer"] else "")
    lines = [
        f"bench detect: {c['human_count']} human / {c['machine_count']} machine texts, {where}",
        f"{'method':<16} {'AUROC':>6} {'TPR@1%FPR':>10} {'FPR got':>8} {'published AUROC':>16}",
    ]
    for m, s in r["methods"].items():
        pub = s.get("published")
        published = "" if pub is None else f(pub["auroc"]) if pub["auroc"] is not None else "n/a"
        lines.append(
            f"{m:<16} {f(s['auroc']):>6} {f(s['tpr_at_1pct_fpr']):>10} {f(s['fpr']):>8} {published:>16}"
        )
    if any("fpr_note" in s for s in r["methods"].values()):
        lines.append(
            f"note: fewer than {round(1 / MAX_FPR)} human texts: TPR at the highest human score (FPR 0)"
        )
    t = r["throughput"]
    seq, conc = t["sequential"], t[f"concurrent_{CONCURRENCY}"]
    lines.append(
        f"throughput: {seq['texts_per_s']:.2f} texts/s sequential, {conc['texts_per_s']:.2f} texts/s with "
        f"{CONCURRENCY} in flight (x{t['ratio_concurrent_vs_sequential']:.2f}); max score diff "
        f"{t['max_abs_score_diff_concurrent_vs_sequential']:.2g}"
    )
    m = r["machine"]
    lines.append(f"machine: {m.get('cpu_model')}, load {m.get('loadavg_start')} -> {m.get('loadavg_end')}")
    return "\n".join(lines)
