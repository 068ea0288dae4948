"""`specmesh bench attribute`: ReAGent against gradient x input and random attribution, through a
real scoring service process.

Every prompt is attributed by each method (rotating their order from prompt to prompt) with the
same request but for the method: the target's greedy continuation of `max_new_tokens` tokens
(the same tokens for every method; checked), `seed` = the prompt's index. The service draws the
faithfulness metrics' masks from the seed alone, so the three methods of a prompt are scored on
the same random numbers and the comparison is paired. Per prompt, a method's soft normalised
sufficiency / comprehensiveness is its mean over the target tokens where the metric is defined
(the context is worth something to the token); a prompt enters a comparison when both methods
have a value. Reported per method: the mean of each metric over prompts; per baseline: the mean
paired difference ReAGent - baseline with a 95% bootstrap interval, how often ReAGent is ahead,
and the Wilcoxon signed-rank test (two-sided, scipy). Seconds are the client's wall time per
call, on the machine in ``machine`` (CPU model, load), not comparable across machines.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.decode import machine_info
from bench.spec.prompts import PromptItem, load_prompt_sets
from bench.spec.provenance import git_info, loadavg

METHODS = ("reagent", "gradient_x_input", "random")
BASELINES = ("gradient_x_input", "random")
METRICS = ("soft_sufficiency", "soft_comprehensiveness")
BOOTSTRAP = 2000


class ScoringProcess:
    """`specmesh serve scoring` as a child process on a free loopback port, stopped on exit
    (with `observer`, Binoculars' observer model, also used by bench/detect.py)."""

    def __init__(self, model: str, threads: int | None, log_path: Path, observer: str | None = None) -> None:
        from specmesh import stack

        self.stack = stack
        self.log = log_path.open("w")
        port = stack.free_port()
        self.address = f"127.0.0.1:{port}"
        argv = [sys.executable, "-m", "specmesh.cli.main", "serve", "scoring", "--model", model]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        if threads:
            argv += ["--threads", str(threads)]
        if observer:
            argv += ["--observer", observer]
        self.child = stack.Child("scoring", argv, self.address, lambda: stack.grpc_serving(self.address))

    def __enter__(self) -> ScoringProcess:
        env = dict(
            os.environ, OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none", PYTHONUNBUFFERED="1"
        )
        self.child.start(env, self.stack.LogSink(self.log, color=False))
        deadline = time.monotonic() + 600
        while not self.child.ready():
            if not self.child.alive or time.monotonic() > deadline:
                self.child.stop(5)
                self.log.close()
                raise self.stack.StackError(f"the scoring service did not start (see {self.log.name})")
            time.sleep(0.25)
        return self

    def __exit__(self, *exc: object) -> None:
        self.child.stop(15)
        self.log.close()


def context_prompt(item: PromptItem):
    from specmesh.v1 import common_pb2

    if item.chat:
        message = common_pb2.ChatMessage(role="user", content=item.prompt)
        return common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=[message]))
    return common_pb2.Prompt(text=item.prompt)


def _value(x: float) -> float | None:
    return None if math.isnan(x) else x


def attribute_once(stub, item: PromptItem, method: str, max_new_tokens: int, seed: int, timeout: float):
    from specmesh.v1 import scoring_pb2

    request = scoring_pb2.AttributeRequest(
        context=context_prompt(item),
        max_new_tokens=max_new_tokens,
        seed=seed,
        method=scoring_pb2.AttributionMethod.Value(f"ATTRIBUTION_METHOD_{method.upper()}"),
    )
    t0 = time.perf_counter()
    reply = stub.Attribute(request, timeout=timeout)
    wall = time.perf_counter() - t0
    return reply, {
        "soft_sufficiency": _value(reply.soft_sufficiency),
        "soft_comprehensiveness": _value(reply.soft_comprehensiveness),
        "per_token_sufficiency": [_value(a.soft_sufficiency) for a in reply.attributions],
        "per_token_comprehensiveness": [_value(a.soft_comprehensiveness) for a in reply.attributions],
        "steps": [a.steps for a in reply.attributions],
        "stopped": [a.stopped for a in reply.attributions],
        "wall_s": wall,
        "service_s": reply.timing.total_ns / 1e9,
    }


def paired(records: Sequence[dict], metric: str, baseline: str, seed: int = 0) -> dict[str, Any]:
    """ReAGent - baseline on `metric` over the prompts where both have a value."""
    import numpy as np
    from scipy.stats import wilcoxon

    pairs = [
        (r["methods"]["reagent"][metric], r["methods"][baseline][metric])
        for r in records
        if r["methods"]["reagent"][metric] is not None and r["methods"][baseline][metric] is not None
    ]
    if not pairs:
        return {"prompts": 0}
    diff = np.array([a - b for a, b in pairs])
    rng = np.random.default_rng(seed)
    boot = rng.choice(diff, size=(BOOTSTRAP, len(diff))).mean(axis=1)
    if np.all(diff == 0):  # scipy refuses a sample of zeros: no evidence either way
        stat, p = 0.0, 1.0
    else:
        test = wilcoxon(diff)
        stat, p = float(test.statistic), float(test.pvalue)
    return {
        "prompts": len(diff),
        "mean_diff": float(diff.mean()),
        "mean_diff_ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
        "reagent_ahead": int((diff > 0).sum()),
        "ties": int((diff == 0).sum()),
        "wilcoxon_statistic": stat,
        "wilcoxon_p": p,
    }


def method_summary(records: Sequence[dict], method: str) -> dict[str, Any]:
    rows = [r["methods"][method] for r in records]
    out: dict[str, Any] = {}
    for metric in METRICS:
        values = [row[metric] for row in rows if row[metric] is not None]
        out[metric] = statistics.fmean(values) if values else None
        out[f"{metric}_prompts"] = len(values)
    out["seconds_per_prompt"] = statistics.fmean(row["wall_s"] for row in rows)
    out["service_seconds_per_prompt"] = statistics.fmean(row["service_s"] for row in rows)
    if method == "reagent":
        steps = [s for row in rows for s in row["steps"]]
        out["mean_steps"] = statistics.fmean(steps)
        out["stopped_share"] = sum(s for row in rows for s in row["stopped"]) / len(steps)
    return out


def measure(
    stub, items: Sequence[tuple[str, int, PromptItem]], max_new_tokens: int, timeout: float, progress: bool
) -> tuple[list[dict[str, Any]], str | None]:
    """Every prompt under every method (rotating the order); the records and the replacement model."""
    from tqdm import tqdm

    records: list[dict[str, Any]] = []
    replacement_model = None
    bar = tqdm(total=len(items) * len(METHODS), unit="call", disable=not progress, dynamic_ncols=True)
    for seed, (name, index, item) in enumerate(items):
        order = METHODS[seed % len(METHODS) :] + METHODS[: seed % len(METHODS)]
        record: dict[str, Any] = {"set": name, "index": index, "source": item.source, "methods": {}}
        for method in order:
            reply, row = attribute_once(stub, item, method, max_new_tokens, seed, timeout)
            record["methods"][method] = row
            targets = list(reply.target_token_ids)
            if record.setdefault("target_tokens", targets) != targets:
                raise RuntimeError(f"{name}[{index}]: {method} explained other target tokens")
            record["context_tokens"] = len(reply.context_token_ids)
            replacement_model = reply.replacement_model or replacement_model
            bar.update()
        records.append(record)
    bar.close()
    return records, replacement_model


def write_png(result: dict[str, Any], path: Path) -> str | None:
    """Per method the mean of each metric, and ReAGent - baseline with its 95% interval; None, or
    a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    fig, (means, diffs) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for k, metric in enumerate(METRICS):
        values = [result["methods"][m][metric] or 0.0 for m in METHODS]
        means.bar([i + (k - 0.5) * width for i in range(len(METHODS))], values, width, label=metric)
        tests = [result["reagent_vs"][b][metric] for b in BASELINES]
        centre = [t.get("mean_diff", 0.0) for t in tests]
        low = [
            c - t["mean_diff_ci95"][0] if t["prompts"] else 0.0 for c, t in zip(centre, tests, strict=True)
        ]
        high = [
            t["mean_diff_ci95"][1] - c if t["prompts"] else 0.0 for c, t in zip(centre, tests, strict=True)
        ]
        xs = [i + (k - 0.5) * width for i in range(len(BASELINES))]
        diffs.errorbar(xs, centre, yerr=[low, high], fmt="o", capsize=4, label=metric)
        for x, t in zip(xs, tests, strict=True):
            if t["prompts"]:
                diffs.annotate(
                    f"p={t['wilcoxon_p']:.2g}", (x, t["mean_diff_ci95"][1]), fontsize=7, ha="center"
                )
    means.set_xticks(range(len(METHODS)), METHODS)
    means.set_ylabel("mean over prompts (higher is better)")
    means.legend(fontsize=8)
    diffs.axhline(0, color="grey", lw=0.8)
    diffs.set_xticks(range(len(BASELINES)), [f"ReAGent - {b}" for b in BASELINES])
    diffs.set_ylabel("paired difference, 95% bootstrap interval")
    c = result["config"]
    fig.suptitle(
        f"attribution faithfulness: {c['prompt_count']} prompts x {c['max_new_tokens']} tokens, "
        f"{c['model']} ({result['machine'].get('cpu_model', '?')})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def run_attribute_bench(
    prompt_files: Sequence[Path],
    *,
    out: Path,
    max_new_tokens: int = 4,
    limit: int | None = None,
    model: str = "smollm2-135m-instruct",
    threads: int | None = None,
    timeout: float = 600.0,
    png: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    import grpc

    from services.core.scoring.attribution import ReagentConfig
    from services.core.scoring.faithfulness import DEFAULT_SAMPLES
    from specmesh.v1 import scoring_pb2_grpc

    out.parent.mkdir(parents=True, exist_ok=True)
    started, load_start, git = time.time(), loadavg(), git_info()
    sets = load_prompt_sets(list(prompt_files), limit)
    items = [(ps.name, i, item) for ps in sets for i, item in enumerate(ps.items)]
    with (
        ScoringProcess(model, threads, out.with_suffix(".service.log")) as service,
        grpc.insecure_channel(service.address) as channel,
    ):
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        records, replacement_model = measure(stub, items, max_new_tokens, timeout, progress)
    result = {
        "benchmark": "attribute",
        "config": {
            "prompts": [str(p) for p in prompt_files],
            "limit": limit,
            "prompt_count": len(records),
            "model": model,
            "replacement_model": replacement_model,
            "max_new_tokens": max_new_tokens,
            "reagent": vars(ReagentConfig()),
            "faithfulness_samples": DEFAULT_SAMPLES,
            "seed": "prompt index (0-based, over all sets in order)",
            "service_threads": threads,
        },
        "methods": {m: method_summary(records, m) for m in METHODS},
        "reagent_vs": {b: {metric: paired(records, metric, b) for metric in METRICS} for b in BASELINES},
        "context_tokens_mean": statistics.fmean(r["context_tokens"] for r in records),
        "target_tokens_mean": statistics.fmean(len(r["target_tokens"]) for r in records),
        "machine": machine_info(threads or 0)
        | {"loadavg_start": load_start, "loadavg_end": loadavg(), **git},
        "wall_s": time.time() - started,
        "records": records,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    result["json"] = str(out)
    result["png_note"] = write_png(result, out.with_suffix(".png")) if png else "--no-png"
    result["png"] = None if result["png_note"] else str(out.with_suffix(".png"))
    return result


def format_summary(r: dict[str, Any]) -> str:
    def f(x: float | None, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    c = r["config"]
    lines = [
        f"bench attribute: {c['prompt_count']} prompts, {c['max_new_tokens']} target tokens each, "
        f"model {c['model']}, replacements from {c['replacement_model']}",
        f"{'method':<18} {'soft NS':>8} {'soft NC':>8} {'s/prompt':>9}",
    ]
    for m, s in r["methods"].items():
        lines.append(
            f"{m:<18} {f(s['soft_sufficiency']):>8} {f(s['soft_comprehensiveness']):>8} "
            f"{f(s['seconds_per_prompt'], '.2f'):>9}"
        )
    reagent = r["methods"]["reagent"]
    lines.append(
        f"ReAGent: {reagent['mean_steps']:.1f} steps per token, {reagent['stopped_share']:.0%} stopped early"
    )
    for b, tests in r["reagent_vs"].items():
        for metric, t in tests.items():
            if not t["prompts"]:
                continue
            lo, hi = t["mean_diff_ci95"]
            lines.append(
                f"ReAGent - {b} {metric}: {t['mean_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] over {t['prompts']} "
                f"prompts, ahead on {t['reagent_ahead']}, Wilcoxon p = {t['wilcoxon_p']:.3g}"
            )
    m = r["machine"]
    lines.append(f"machine: {m.get('cpu_model')}, load {m.get('loadavg_start')} -> {m.get('loadavg_end')}")
    return "\n".join(lines)
