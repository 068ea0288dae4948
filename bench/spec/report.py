"""The printed summary: one table per prompt set (and overall), the best speculative run, and
greedy identity with each mismatch."""

from __future__ import annotations

import math
from typing import Any


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{suffix}"


def format_summary(result: dict[str, Any]) -> str:
    lines: list[str] = []
    groups = [(name, g) for name, g in result["sets"].items()]
    if len(groups) > 1:
        groups.append(("overall", result["overall"]))
    for name, group in groups:
        head = ("run", "tokens", "wall s", "tok/s", "tau", "accept", "x target", "x tgt tok/s", "x HF-asst")
        rows = [head]
        for run, s in group["runs"].items():
            rows.append(
                (
                    run,
                    str(s["output_tokens"]) + (f" ({s['failed']} failed)" if s["failed"] else ""),
                    _fmt(s["wall_s"], ".2f"),
                    _fmt(s["tokens_per_s"], ".1f"),
                    _fmt(s["tau"], ".2f")
                    if s["tau"] is not None
                    else _fmt(s.get("tokens_per_target_forward"), ".2f", "*"),
                    _fmt(s["acceptance_rate"], ".1%"),
                    _fmt(s["speedup_vs_target"], ".2f", "x"),
                    _fmt(s["speedup_vs_target_tokens_per_s"], ".2f", "x"),
                    _fmt(s.get("speedup_vs_hf_assisted"), ".2f", "x"),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        table = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        n = group["num_prompts"]
        lines.append(f"== {name} ({n} prompts) ==")
        lines += [table[0], "-" * len(table[0]), *table[1:]]
        best = group["best_speculative"]
        if best:
            lines.append(
                f"best speculative: {best['run']}: {_fmt(best['tokens_per_s'], '.1f')} tok/s, "
                f"tau {_fmt(best['tau'], '.2f')}, {_fmt(best['speedup_vs_target'], '.2f')}x vs target, "
                f"{_fmt(best['speedup_vs_hf_assisted'], '.2f')}x vs HF assisted"
            )
        lines.append("")
    lines.append("* transformers: tokens per target forward (no acceptance counts available)")
    gi = result["greedy_identical"]
    if gi is None:
        lines.append(f"greedy identical: n/a (temperature {result['config']['temperature']} > 0)")
    else:
        lines.append(
            f"greedy identical: {gi}"
            + ("" if gi else f" ({len(result['mismatches'])} mismatching outputs, see 'mismatches')")
        )
        lines += identity_lines(result)
    m = result["machine"]
    lines.append(f"load average: start {m['loadavg_start']}, end {m['loadavg_end']} ({m['cpu_count']} CPUs)")
    return "\n".join(lines)


def identity_lines(result: dict[str, Any]) -> list[str]:
    """Identical fraction per speculative run, and each mismatch with the target's logit margins."""
    lines = []
    for run, v in (result.get("greedy_identity") or {}).items():
        lines.append(
            f"  {run}: {v['identical']}/{v['compared']} outputs identical ({_fmt(v['fraction'], '.1%')})"
        )
    for m in result["mismatches"]:
        tie = {True: "near-tie", False: "NOT a near-tie", None: "no token pair"}[m.get("near_tie")]
        lines.append(
            f"  mismatch {m['set']}[{m['prompt_index']}] {m['run']}: first difference at token "
            f"{m['first_diff_index']} ({m['target_token']} vs {m['run_token']}), target top-2 margin "
            f"{_fmt(m.get('target_top2_margin'), '.2e')}, "
            f"logit gap {_fmt(m.get('target_vs_run_logit_gap'), '.2e')}: {tie}"
        )
    return lines
