"""Greedy identity: speculative output against target-only output, token for token.

Target-only decoding and verification compute logits through different matrix paths (1-2 rows
through BLAS, 3+ through oneDNN-packed weights; services/core/model.py, `linear`), so greedy
output is identical up to floating-point ties: where the target's two best logits are closer
than the paths' rounding difference, either can win. Each mismatch therefore carries the
target's logits at its first divergence, which tell a near-tie from a bug.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bench.decode import _first_diff
from bench.spec.prompts import PromptKey
from bench.spec.runs import HF_ASSISTED, HF_GENERATE, TARGET_RUN, Record, RunConfig
from bench.spec.stats import div

# Logit gap under which a greedy mismatch counts as a floating-point near-tie. Target-only decoding
# (1-2 token forwards, BLAS) and verification (3+ tokens, oneDNN-packed weights) sum in different
# orders (services/core/model.py, `linear`). Measured with the SmolLM2 target in fp32, the same 12
# rows through both paths: logits differ by at most 1.4e-4 (72 positions of 6 identity.jsonl
# prompts, Intel Xeon, 2 cores); this bound leaves ~70x headroom for longer contexts, and a wider
# gap is not explained by rounding.
NEAR_TIE_LOGIT_GAP = 1e-2


def greedy_mismatches(runs: Sequence[RunConfig], records: Sequence[Record]) -> list[dict[str, Any]]:
    """Every speculative output that differs from the target-only output of the same prompt."""
    target = {r.key: r for r in records if r.run == TARGET_RUN and r.ok}
    names = {r.name for r in runs if r.speculative}
    out = []
    for rec in records:
        if rec.run not in names or not rec.ok or rec.key not in target:
            continue
        ref = target[rec.key].tokens
        diff = _first_diff(ref, rec.tokens)
        if diff is not None:
            out.append(
                {
                    "set": rec.set,
                    "prompt_index": rec.prompt_index,
                    "run": rec.run,
                    "first_diff_index": diff,
                    "target_token": ref[diff] if diff < len(ref) else None,
                    "run_token": rec.tokens[diff] if diff < len(rec.tokens) else None,
                    "target_length": len(ref),
                    "run_length": len(rec.tokens),
                }
            )
    return out


def greedy_identity(runs: Sequence[RunConfig], records: Sequence[Record]) -> dict[str, dict[str, Any]]:
    """Per speculative run: outputs compared with the target-only output of the same prompt (both
    requests completed) and how many of them are identical token for token."""
    target = {r.key: r.tokens for r in records if r.run == TARGET_RUN and r.ok}
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        if not run.speculative:
            continue
        pairs = [(target[r.key], r.tokens) for r in records if r.run == run.name and r.ok and r.key in target]
        same = sum(ref == toks for ref, toks in pairs)
        out[run.name] = {"compared": len(pairs), "identical": same, "fraction": div(same, len(pairs))}
    return out


def identical_fraction(identity: dict[str, dict[str, Any]]) -> float | None:
    """Identical outputs over outputs compared, all speculative runs together."""
    return div(sum(v["identical"] for v in identity.values()), sum(v["compared"] for v in identity.values()))


def add_logit_margins(
    mismatches: list[dict[str, Any]],
    records: Sequence[Record],
    prompt_ids: dict[PromptKey, list[int]],
    next_logits: Callable[[list[int]], Sequence[float]],
) -> None:
    """Annotate each mismatch with the target's logits at its first divergence: the top-2 margin
    and the gap between the target-only token and the speculative one (``near_tie`` when that gap
    is under NEAR_TIE_LOGIT_GAP). `next_logits(ids)` is the target's next-token logits after `ids`.
    A divergence where one output has ended (EOS) has no token pair to compare and gets None."""
    target = {r.key: r.tokens for r in records if r.run == TARGET_RUN and r.ok}
    for m in mismatches:
        m.update(target_top2_margin=None, target_vs_run_logit_gap=None, near_tie=None)
        if m["target_token"] is None or m["run_token"] is None:
            continue
        key = (m["set"], m["prompt_index"])
        logits = list(next_logits(prompt_ids[key] + target[key][: m["first_diff_index"]]))
        top1, top2 = sorted(logits, reverse=True)[:2]
        gap = logits[m["target_token"]] - logits[m["run_token"]]
        m.update(
            target_top2_margin=top1 - top2,
            target_vs_run_logit_gap=gap,
            near_tie=abs(gap) < NEAR_TIE_LOGIT_GAP,
        )


def greedy_verdict(
    runs: Sequence[RunConfig], records: Sequence[Record], mismatches: list
) -> tuple[bool, str | None]:
    """greedy_identical (no mismatch and every target and speculative request completed) and a
    note when some comparison could not be made."""
    target_ok = {r.key for r in records if r.run == TARGET_RUN and r.ok}
    spec_names = {x.name for x in runs if x.speculative}
    complete = all(r.ok and r.key in target_ok for r in records if r.run in spec_names)
    note = (
        None
        if complete
        else "some target or speculative requests failed, so identity could not be checked everywhere"
    )
    return not mismatches and complete, note


def hf_outputs_equal_to_target(records: Sequence[Record]) -> dict[str, int]:
    """Per transformers baseline: outputs equal to the stack's target-only output."""
    ref = {r.key: r.tokens for r in records if r.run == TARGET_RUN and r.ok}
    return {
        name: sum(1 for r in records if r.run == name and r.ok and ref.get(r.key) == r.tokens)
        for name in (HF_GENERATE, HF_ASSISTED)
    }
