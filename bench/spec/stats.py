"""Aggregation: per-run sums and rates, ratios against a baseline over the prompts both
completed, and the best speculative run of a group of records."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from bench.spec.runs import HF_ASSISTED, HF_GENERATE, TARGET_RUN, Record, RunConfig


def div(a: float, b: float) -> float | None:
    """a / b, None when b is 0 (a run with no tokens, rounds or time has no rate)."""
    return a / b if b else None


def summarize(run: RunConfig, records: Sequence[Record]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    tokens = sum(len(r.tokens) for r in ok)
    wall = sum(r.wall_s for r in ok)
    rounds = sum(r.rounds for r in ok)
    drafted = sum(r.drafted for r in ok)
    accepted = sum(r.accepted for r in ok)
    s: dict[str, Any] = {
        "kind": run.kind,
        "policy": run.policy,
        "strategy": run.strategy,
        "adaptive": run.adaptive,
        "lookup_tokens": run.lookup_tokens,
        "requests": len(records),
        "failed": len(records) - len(ok),
        "output_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "wall_s": wall,
        "tokens_per_s": div(tokens, wall),
        "wall_s_per_request_median": statistics.median(r.wall_s for r in ok) if ok else None,
        "finish_reasons": dict(Counter(r.finish_reason for r in ok)),
    }
    if run.policy == "draft":  # the draft alone: nothing is verified, so no tau / acceptance
        s.update(drafted_tokens=drafted, tau=None, acceptance_rate=None)
    elif run.kind == "stack":
        s.update(
            rounds=rounds,
            drafted_tokens=drafted,
            accepted_tokens=accepted,
            # tau counts the correction/bonus token of every round (1.0 for the target alone)
            tau=div(accepted + rounds, rounds),
            acceptance_rate=div(accepted, drafted),
            tokens_per_round=div(tokens, rounds),
            cached_prompt_tokens=sum(r.cached_prompt_tokens for r in ok),
        )
    else:
        s.update(
            target_forwards=rounds,
            draft_forwards=sum(r.draft_forwards or 0 for r in ok) if run.assisted else None,
            # transformers reports no acceptance counts; tokens per target forward is its tau
            # (the last round may be cut by max_new_tokens / EOS, as in tokens_per_round above)
            tokens_per_target_forward=div(tokens, rounds),
            tau=None,
            acceptance_rate=None,
        )
    return s


def compare(base: Sequence[Record], cand: Sequence[Record]) -> dict[str, Any]:
    """Ratios of `cand` against `base` over the prompts both completed."""
    b = {r.key: r for r in base if r.ok}
    c = {r.key: r for r in cand if r.ok}
    common = sorted(b.keys() & c.keys())
    if not common:
        return {"prompts": 0, "wall_ratio": None, "tokens_per_s_ratio": None, "median_prompt": None}
    bw, cw = sum(b[k].wall_s for k in common), sum(c[k].wall_s for k in common)
    bt, ct = sum(len(b[k].tokens) for k in common), sum(len(c[k].tokens) for k in common)
    per = [
        (len(c[k].tokens) / c[k].wall_s) / (len(b[k].tokens) / b[k].wall_s)
        for k in common
        if c[k].wall_s > 0 and b[k].wall_s > 0 and c[k].tokens and b[k].tokens
    ]
    tps_b, tps_c = div(bt, bw), div(ct, cw)
    return {
        "prompts": len(common),
        "wall_ratio": div(bw, cw),
        "tokens_per_s_ratio": div(tps_c or 0.0, tps_b or 0.0) if tps_b and tps_c else None,
        "median_prompt": statistics.median(per) if per else None,
    }


def summarize_group(runs: Sequence[RunConfig], records: Sequence[Record]) -> dict[str, Any]:
    """Per-run summaries with speedups, and the best speculative run, over `records`."""
    by_run: dict[str, list[Record]] = {r.name: [] for r in runs}
    for rec in records:
        by_run[rec.run].append(rec)
    out: dict[str, Any] = {}
    for run in runs:
        s = summarize(run, by_run[run.name])
        vs_t = compare(by_run[TARGET_RUN], by_run[run.name])
        s["speedup_vs_target"] = vs_t["wall_ratio"]
        s["speedup_vs_target_tokens_per_s"] = vs_t["tokens_per_s_ratio"]
        s["speedup_vs_target_median_prompt"] = vs_t["median_prompt"]
        for hf_name, key in (
            (HF_ASSISTED, "speedup_vs_hf_assisted"),
            (HF_GENERATE, "speedup_vs_hf_generate"),
        ):
            if hf_name in by_run and run.name != hf_name:
                vs = compare(by_run[hf_name], by_run[run.name])
                s[key] = vs["tokens_per_s_ratio"]
                s[f"{key}_median_prompt"] = vs["median_prompt"]
        out[run.name] = s
    spec = [r.name for r in runs if r.speculative and out[r.name]["tokens_per_s"]]
    best = max(spec, key=lambda n: out[n]["tokens_per_s"]) if spec else None
    group: dict[str, Any] = {"runs": out, "best_speculative": None}
    if best is not None:
        b = out[best]
        group["best_speculative"] = {
            "run": best,
            "tokens_per_s": b["tokens_per_s"],
            "tau": b["tau"],
            "acceptance_rate": b["acceptance_rate"],
            "speedup_vs_target": b["speedup_vs_target"],
            "speedup_vs_target_tokens_per_s": b["speedup_vs_target_tokens_per_s"],
            "speedup_vs_hf_assisted": b.get("speedup_vs_hf_assisted"),
            "speedup_vs_hf_generate": b.get("speedup_vs_hf_generate"),
        }
    group["speedup_vs_target"] = group["best_speculative"]["speedup_vs_target"] if best else None
    group["speedup_vs_hf_assisted"] = group["best_speculative"]["speedup_vs_hf_assisted"] if best else None
    return group
