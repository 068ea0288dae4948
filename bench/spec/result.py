"""The JSON document of a run (schema SCHEMA_VERSION), and writing it with its PNG."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.spec.config import SCHEMA_VERSION, SpecBenchConfig
from bench.spec.identity import NEAR_TIE_LOGIT_GAP
from bench.spec.measure import Measurement
from bench.spec.plot import write_png
from bench.spec.prompts import PromptKey, PromptSet
from bench.spec.runs import TARGET_RUN, Record
from bench.spec.stats import div, summarize_group


def per_prompt(
    ps: PromptSet, recs: Sequence[Record], prompt_ids: dict[PromptKey, list[int]], seed: int, tokenizer: Any
) -> list[dict[str, Any]]:
    """Each prompt of a set with every configuration's record (and the target's text)."""
    out = []
    for i, item in enumerate(ps.items):
        mine = {r.run: r for r in recs if r.prompt_index == i}
        tgt = mine.get(TARGET_RUN)
        out.append(
            {
                "prompt_index": i,
                "prompt": item.prompt,
                "chat": item.chat,
                "source": item.source,
                "prompt_tokens": len(prompt_ids[(ps.name, i)]),
                "seed": seed + i,
                "target_text": tokenizer.decode(tgt.tokens) if tgt and tgt.ok else None,
                "runs": {
                    name: {k: v for k, v in asdict(r).items() if k not in ("run", "set", "prompt_index")}
                    | {"tokens_per_s": div(len(r.tokens), r.wall_s)}
                    for name, r in mine.items()
                },
            }
        )
    return out


def set_sections(
    sets: Sequence[PromptSet],
    m: Measurement,
    prompt_ids: dict[PromptKey, list[int]],
    seed: int,
    tokenizer: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ps in sets:
        recs = [r for r in m.records if r.set == ps.name]
        out[ps.name] = {
            "prompts_file": ps.path,
            "num_prompts": len(ps.items),
            "chat_prompts": sum(it.chat for it in ps.items),
            **m.set_load.get(ps.name, {}),
            **summarize_group(m.runs, recs),
            "per_prompt": per_prompt(ps, recs, prompt_ids, seed, tokenizer),
        }
    return out


def config_section(cfg: SpecBenchConfig, target_dir: Path, m: Measurement) -> dict[str, Any]:
    return {
        "prompt_files": [str(p) for p in cfg.paths],
        "target_model": cfg.target_model,
        "target_dir": str(target_dir),
        "draft_model": cfg.draft_model,
        "gateway": cfg.gateway or "started by this benchmark (specmesh.stack.LocalStack)",
        "redis": cfg.redis if cfg.gateway is None else None,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_k": 0,
        "top_p": None,
        "ignore_eos": cfg.ignore_eos,
        "seed": cfg.seed,
        "seeding": "prompt i of every set uses seed + i, the same seed for every configuration",
        "limit": cfg.limit,
        "strategies": cfg.strategies,
        "adaptive": cfg.adaptive,
        "compare_lookup": cfg.compare_lookup,
        "draft_policy": cfg.draft_policy,
        "runs": [asdict(r) for r in m.runs],
        "prompt_format": "chat=true: the target's chat template with one user message and the "
        "generation prompt; chat=false: the raw text. Sent to the gateway as token ids.",
        "interleaving": "per prompt, every configuration in a rotating order, after one short "
        "warm-up request of each",
        "timing": "client-side wall time per request (Gateway.Generate, unary), summed per run",
        "hf": m.hf_info,
        "hf_error": m.hf_error,
        "request_timeout_s": cfg.request_timeout,
    }


def build_result(
    cfg: SpecBenchConfig,
    *,
    config: dict[str, Any],
    machine: dict[str, Any],
    notes: list[str],
    greedy: dict[str, Any],
    failed: list[dict[str, Any]],
    overall: dict[str, Any],
    sets: dict[str, Any],
    started: float,
    stack_log: Path | None,
) -> dict[str, Any]:
    """The document, keys in the order readers know; `greedy` holds greedy_identical,
    greedy_identical_note, greedy_identical_fraction, greedy_identity, mismatches and
    hf_outputs_equal_to_target."""
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "spec",
        "config": config,
        "machine": machine,
        "notes": notes,
        "greedy_identical": greedy["greedy_identical"],
        "greedy_identical_note": greedy["greedy_identical_note"],
        "greedy_identical_fraction": greedy["greedy_identical_fraction"],
        "greedy_identity": greedy["greedy_identity"],
        "near_tie_logit_gap": NEAR_TIE_LOGIT_GAP,
        "mismatches": greedy["mismatches"],
        "hf_outputs_equal_to_target": greedy["hf_outputs_equal_to_target"],
        "failed_requests": failed,
        "overall": overall,
        "sets": sets,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": time.time() - started,
        "stack_log": str(stack_log) if stack_log else None,
        "json": str(cfg.out),
        "png": None,
        "png_note": None,
    }


def write_outputs(result: dict[str, Any], cfg: SpecBenchConfig) -> None:
    """The PNG (unless disabled; a note says why there is none) and then the JSON, at cfg.out."""
    out = Path(cfg.out)
    if cfg.png:
        png_path = out.with_suffix(".png")
        note = write_png(result, png_path)
        result["png"], result["png_note"] = (None, note) if note else (str(png_path), None)
    else:
        result["png_note"] = "PNG disabled"
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
