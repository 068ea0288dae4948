"""`specmesh bench route`: token routing (R2R) against the other policies, through the real stack.

Every prompt runs greedily under each policy (target, draft, speculative, r2r at the router's
threshold, auto with quality fast, exact and high) in a rotating order, then r2r once per swept
threshold. Quality is measured by the
target itself: ``target_nll`` is the target's mean negative log-likelihood of the generated
continuation (Target.Score), ``exact_match`` the share of prompts whose output equals the
target-only output. For r2r, ``nll_gap_closed = (NLL_draft - NLL_r2r) / (NLL_draft -
NLL_target)`` says how much of the quality gap between the small and the large model routing
recovers, and ``target_share`` how many output tokens the target produced to do it.

Speed figures are ratios against policy target measured in the same run on the same machine
(its CPU model is in ``machine``); they are not comparable across machines.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.decode import machine_info
from bench.spec.prompts import encode_prompts, load_prompt_sets
from bench.spec.provenance import git_info, loadavg

POLICIES = ("target", "draft", "speculative", "r2r", "auto")  # auto: with quality fast
AUTO_QUALITIES = ("exact", "high")  # also run as auto:exact, auto:high
DEFAULT_SWEEP = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9)


@dataclass
class Outcome:
    """One request's output and figures."""

    tokens: list[int]
    wall_s: float
    routed: int = 0  # r2r: tokens the target produced
    router_calls: int = 0
    catch_up: int = 0
    nll: float | None = None  # the target's mean NLL of `tokens` after the prompt
    chosen: str | None = None  # auto: the policy it chose


@dataclass
class Run:
    name: str
    policy: str
    threshold: float | None = None  # r2r: None = the router's own
    quality: str | None = None  # auto
    outcomes: dict[tuple[str, int], Outcome] = field(default_factory=dict)


def _request(
    policy: str,
    prompt: Sequence[int],
    max_new_tokens: int,
    threshold: float | None,
    quality: str | None = None,
):
    from gateway.config import policy_value
    from specmesh.v1 import common_pb2, gateway_pb2

    request = gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(prompt))),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=0),
        policy=policy_value(policy),
    )
    if threshold is not None:
        request.route.threshold = threshold
    if quality is not None:
        request.quality = gateway_pb2.Quality.Value(f"QUALITY_{quality.upper()}")
    return request


def _generate(stub, request, timeout: float) -> Outcome:
    t0 = time.perf_counter()
    response = stub.Generate(request, timeout=timeout)
    wall = time.perf_counter() - t0
    from gateway.config import policy_name

    s = response.spec_stats
    chosen = policy_name(response.auto.policy) if response.HasField("auto") else None
    return Outcome(
        list(response.token_ids), wall, s.routed_tokens, s.router_calls, s.catch_up_tokens, chosen=chosen
    )


def _target_tokens(policy: str, outcome: Outcome) -> int:
    """Output tokens the target produced: all of them under target and speculative (verified,
    lossless), none under draft, the routed ones under r2r; auto: those of the policy it chose."""
    policy = outcome.chosen or policy
    if policy in ("target", "speculative"):
        return len(outcome.tokens)
    return outcome.routed if policy == "r2r" else 0


def _target_nll(target_stub, prompt: Sequence[int], tokens: Sequence[int]) -> float | None:
    """The target's mean NLL (nats per token) of `tokens` following `prompt`."""
    from specmesh.v1 import common_pb2, target_pb2

    if not tokens:
        return None
    reply = target_stub.Score(
        target_pb2.ScoreRequest(
            input=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[*prompt, *tokens])), start=len(prompt)
        ),
        timeout=120,
    )
    return -reply.total_logprob / len(tokens)


def _summary(run: Run, baseline: Run) -> dict[str, Any]:
    """A run's figures over every prompt, with ratios against `baseline` (policy target)."""
    keys = [k for k in run.outcomes if k in baseline.outcomes]
    outs = [run.outcomes[k] for k in keys]
    tokens = sum(len(o.tokens) for o in outs)
    wall = sum(o.wall_s for o in outs)
    base_tps = sum(len(baseline.outcomes[k].tokens) for k in keys) / max(
        1e-9, sum(baseline.outcomes[k].wall_s for k in keys)
    )
    nlls = [o.nll for o in outs if o.nll is not None]
    produced_by_target = sum(_target_tokens(run.policy, o) for o in outs)
    chosen = [o.chosen for o in outs if o.chosen]
    return {
        "threshold": run.threshold,
        "quality": run.quality,
        "chosen": {p: chosen.count(p) for p in sorted(set(chosen))} if chosen else None,
        "prompts": len(outs),
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else None,
        "speedup_vs_target": (tokens / wall) / base_tps if wall and base_tps else None,
        "target_share": produced_by_target / tokens if tokens else None,
        "target_nll": sum(nlls) / len(nlls) if nlls else None,
        "exact_match": sum(run.outcomes[k].tokens == baseline.outcomes[k].tokens for k in keys) / len(keys)
        if keys
        else None,
        "router_calls": sum(o.router_calls for o in outs),
        "catch_up_tokens": sum(o.catch_up for o in outs),
    }


def _gap_closed(summary: dict[str, Any], draft: dict[str, Any], target: dict[str, Any]) -> float | None:
    d, t, r = draft["target_nll"], target["target_nll"], summary["target_nll"]
    if None in (d, t, r) or abs(d - t) < 1e-9:
        return None
    return (d - r) / (d - t)


def _router_report(draft_model: str) -> dict[str, Any] | None:
    """The served router's held-out figures, from its router.json."""
    from services.core.model_store import resolve_model

    path = resolve_model(draft_model) / "router" / "router.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return {"path": str(path), "threshold": meta.get("threshold"), "report": meta.get("report", meta)}


def write_png(result: dict[str, Any], path: Path) -> str | None:
    """The quality/speed frontier as the threshold varies; None (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    sweep = [s for s in result["sweep"] if s["target_share"] is not None and s["nll_gap_closed"] is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([s["target_share"] for s in sweep], [s["nll_gap_closed"] for s in sweep], "o-", label="r2r sweep")
    for s in sweep:
        ax.annotate(
            f"t={s['threshold']:g}\n{s['speedup_vs_target']:.2f}x",
            (s["target_share"], s["nll_gap_closed"]),
            fontsize=7,
            xytext=(4, -10),
            textcoords="offset points",
        )
    ax.axhline(0.7, color="grey", lw=0.8, ls="--")
    ax.axvline(0.3, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("target share of output tokens")
    ax.set_ylabel("NLL gap closed (draft -> target)")
    ax.set_title(f"r2r frontier ({result['machine'].get('cpu_model', '?')})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def run_route_bench(
    prompt_files: Sequence[Path],
    *,
    out: Path,
    max_new_tokens: int = 64,
    thresholds: Sequence[float] = DEFAULT_SWEEP,
    limit: int | None = None,
    target_model: str = "smollm2-135m-instruct",
    draft_model: str = "smollm2-135m-instruct-draft",
    threads: int | None = None,
    timeout: float = 600.0,
    png: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    import grpc
    from tqdm import tqdm

    from services.core.model_store import resolve_model
    from services.core.tokenizer import Tokenizer
    from specmesh.stack import LocalStack, LogSink, StackConfig
    from specmesh.v1 import gateway_pb2_grpc, target_pb2_grpc

    out.parent.mkdir(parents=True, exist_ok=True)
    started, load_start, git = time.time(), loadavg(), git_info()
    sets = load_prompt_sets(list(prompt_files), limit)
    prompts = encode_prompts(sets, Tokenizer.from_dir(resolve_model(target_model)))
    runs = [Run(p, p, quality="fast" if p == "auto" else None) for p in POLICIES]
    runs += [Run(f"auto:{q}", "auto", quality=q) for q in AUTO_QUALITIES]
    runs += [Run(f"r2r@{t:g}", "r2r", t) for t in thresholds]
    timed = len(POLICIES) + len(AUTO_QUALITIES)  # rotated per prompt; the sweep runs after them
    stack_log = out.with_suffix(".stack.log")
    config = StackConfig(
        model=target_model,
        draft_model=draft_model,
        gateway_port=0,
        redis=False,
        target_threads=threads,
        draft_threads=threads,
        warmup=True,
    )
    with open(stack_log, "w", encoding="utf-8") as log_file:
        stack = LocalStack(config, LogSink(log_file, color=False))
        print(f"starting the local stack (logs: {stack_log}) ...", file=sys.stderr, flush=True)
        stack.start()
        try:
            with (
                grpc.insecure_channel(stack.gateway) as g_channel,
                grpc.insecure_channel(stack.address("target")) as t_channel,
            ):
                stub = gateway_pb2_grpc.GatewayStub(g_channel)
                target_stub = target_pb2_grpc.TargetServiceStub(t_channel)
                first = next(iter(prompts.values()))
                for run in runs[:timed]:  # warm-up: one request per policy, not timed
                    _generate(stub, _request(run.policy, first, 8, run.threshold, run.quality), timeout)
                bar = tqdm(total=len(prompts) * len(runs), disable=not progress, desc="route", unit="req")
                for i, (key, prompt) in enumerate(prompts.items()):
                    order = runs[:timed]
                    k = i % len(order)  # rotate the policies so none always goes first
                    for run in [*order[k:], *order[:k], *runs[timed:]]:
                        request = _request(run.policy, prompt, max_new_tokens, run.threshold, run.quality)
                        run.outcomes[key] = _generate(stub, request, timeout)
                        bar.update()
                bar.close()
                for run in runs:  # quality, after the timed part
                    for key, outcome in run.outcomes.items():
                        outcome.nll = _target_nll(target_stub, prompts[key], outcome.tokens)
        finally:
            stack.stop()

    base = runs[0]
    policies = {run.name: _summary(run, base) for run in runs[:timed]}
    for name in ("r2r", "auto", *(f"auto:{q}" for q in AUTO_QUALITIES)):
        policies[name]["nll_gap_closed"] = _gap_closed(policies[name], policies["draft"], policies["target"])
    sweep = []
    for run in runs[timed:]:
        s = _summary(run, base)
        s["nll_gap_closed"] = _gap_closed(s, policies["draft"], policies["target"])
        sweep.append(s)
    r2r = policies["r2r"]
    targets = {
        "r2r_target_share_at_most_0.3": r2r["target_share"] is not None and r2r["target_share"] <= 0.3,
        "r2r_nll_gap_closed_at_least_0.7": (r2r["nll_gap_closed"] or 0) >= 0.7,
        "r2r_speedup_at_least_1.5": (r2r["speedup_vs_target"] or 0) >= 1.5,
        "auto_fast_not_slower_than_target": (policies["auto"]["speedup_vs_target"] or 0) >= 1.0,
        "auto_exact_equals_target": policies["auto:exact"]["exact_match"] == 1.0,
    }
    result: dict[str, Any] = {
        "benchmark": "route",
        "prompts": [str(p) for p in prompt_files],
        "num_prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "greedy": True,
        "policies": policies,
        "sweep": sweep,
        "router": _router_report(draft_model),
        "targets_met": targets,
        "notes": [
            "auto is run with quality fast (key auto), exact and high (auto:exact, auto:high); "
            "chosen counts the policy it picked per prompt",
            "the sweep runs after the rotated policies, in threshold order",
        ],
        "machine": machine_info(threads or 0)
        | {"loadavg_start": load_start, "loadavg_end": loadavg(), **git},
        "config": {"target_model": target_model, "draft_model": draft_model, "thresholds": list(thresholds)},
        "started": started,
        "seconds": round(time.time() - started, 1),
        "stack_log": str(stack_log),
    }
    result["png"] = None
    if png:
        png_path = out.with_suffix(".png")
        note = write_png(result, png_path)
        if note is None:
            result["png"] = str(png_path)
        else:
            result["notes"].append(note)
    out.write_text(json.dumps(result, indent=2) + "\n")
    result["json"] = str(out)
    return result


def format_summary(result: dict[str, Any]) -> str:
    lines = [f"{'policy':<12} {'tok/s':>7} {'speedup':>8} {'target%':>8} {'NLL':>6} {'exact':>6} {'gap':>6}"]

    def row(name: str, s: dict[str, Any] | None) -> str:
        if s is None:
            return f"{name:<12} (not served)"

        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"

        return (
            f"{name:<12} {f(s['tokens_per_s'], '7.1f')} {f(s['speedup_vs_target'], '7.2f')}x "
            f"{f(s['target_share'] and 100 * s['target_share'], '7.1f')}% {f(s['target_nll'], '6.3f')} "
            f"{f(s['exact_match'], '6.2f')} {f(s.get('nll_gap_closed'), '6.2f')}"
        )

    for name, s in result["policies"].items():
        lines.append(row(name, s))
    for s in result["sweep"]:
        lines.append(row(f"r2r@{s['threshold']:g}", s))
    lines.append(f"CPU: {result['machine'].get('cpu_model')}; targets met: {result['targets_met']}")
    return "\n".join(lines)
