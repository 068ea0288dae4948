"""run_spec_bench: the steps of one run, in order (each lives in its own module)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.spec import identity, measure, provenance
from bench.spec.client import StackClient
from bench.spec.config import GATEWAY_NOTE, OVERHEAD_NOTE, T_POSITIVE_NOTE, SpecBenchConfig
from bench.spec.hf import hf_next_logits, load_hf_target
from bench.spec.prompts import encode_prompts, load_prompt_sets
from bench.spec.result import build_result, config_section, set_sections, write_outputs
from bench.spec.runs import Record, plan_runs
from bench.spec.stats import summarize_group


def run_spec_bench(prompt_files: Sequence[str | Path], **options: Any) -> dict[str, Any]:
    """Run the benchmark; write JSON (+ PNG) to `out` and return the result. `options` are the
    fields of SpecBenchConfig (`out` is required)."""
    from services.core.model_store import resolve_model
    from services.core.tokenizer import Tokenizer

    cfg = SpecBenchConfig(prompt_files, **options)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    loadavg_start, started = provenance.loadavg(), time.time()
    git_start = provenance.git_info()

    sets = load_prompt_sets(cfg.paths, cfg.limit)
    target_dir = resolve_model(cfg.target_model)
    tokenizer = Tokenizer.from_dir(target_dir)
    prompt_ids = encode_prompts(sets, tokenizer)
    m = measure.Measurement(
        plan_runs(
            cfg.strategies,
            adaptive=cfg.adaptive,
            draft_policy=cfg.draft_policy,
            hf=cfg.hf,
            compare_lookup=cfg.compare_lookup,
        )
    )
    notes = [OVERHEAD_NOTE]
    hf_runner = None
    with measure.omp_environment(cfg, m, notes) as child_env:
        notes += ([T_POSITIVE_NOTE] if not cfg.greedy else []) + ([GATEWAY_NOTE] if cfg.gateway else [])
        with measure.gateway_address(cfg, child_env, m, notes) as address:
            client = StackClient(address, cfg.request_timeout)
            try:
                served = client.list_models()
                if served and cfg.target_model not in {s["name"] for s in served}:
                    notes.append(
                        f"the gateway serves {[s['name'] for s in served]}, not {cfg.target_model!r}: "
                        f"prompts were tokenized with {cfg.target_model!r}'s tokenizer"
                    )
                if cfg.hf:
                    hf_runner = measure.load_hf(cfg, target_dir, tokenizer, m, notes)
                generate = measure.Generator(cfg, prompt_ids, client, hf_runner)
                measure.warm_up(generate, m.runs, (sets[0].name, 0), cfg)
                measure.interleaved(generate, sets, cfg, m)
            finally:
                client.close()

    greedy = _greedy_section(cfg, m, prompt_ids, target_dir, hf_runner)
    overall = summarize_group(m.runs, m.records)
    overall["num_prompts"] = sum(len(ps.items) for ps in sets)
    machine = provenance.machine(cfg, m.omp_in_process, loadavg_start, git_start)
    git_end = provenance.git_info()
    if git_end != git_start:
        machine["git_at_end"] = git_end
        notes.append("the checkout changed while the benchmark ran (see machine.git_at_end)")
    result = build_result(
        cfg,
        config=config_section(cfg, target_dir, m),
        machine=machine,
        notes=notes,
        greedy=greedy,
        failed=_failed(m.records),
        overall=overall,
        sets=set_sections(sets, m, prompt_ids, cfg.seed, tokenizer),
        started=started,
        stack_log=m.stack_log,
    )
    write_outputs(result, cfg)
    return result


def _greedy_section(
    cfg: SpecBenchConfig, m: measure.Measurement, prompt_ids: dict, target_dir: Path, hf_runner: Any
) -> dict[str, Any]:
    """Greedy identity (T = 0 only): verdict, fractions, mismatches with the target's margins."""
    if not cfg.greedy:
        return {
            "greedy_identical": None,
            "greedy_identical_note": T_POSITIVE_NOTE,
            "greedy_identical_fraction": None,
            "greedy_identity": None,
            "mismatches": [],
            "hf_outputs_equal_to_target": None,
        }
    mismatches = identity.greedy_mismatches(m.runs, m.records)
    if mismatches:  # one forward per mismatch; the transformers target if it is loaded already
        model = hf_runner.target if hf_runner is not None else load_hf_target(target_dir)
        identity.add_logit_margins(mismatches, m.records, prompt_ids, hf_next_logits(model))
    same, note = identity.greedy_verdict(m.runs, m.records, mismatches)
    per_run = identity.greedy_identity(m.runs, m.records)
    return {
        "greedy_identical": same,
        "greedy_identical_note": note,
        "greedy_identical_fraction": identity.identical_fraction(per_run),
        "greedy_identity": per_run,
        "mismatches": mismatches,
        "hf_outputs_equal_to_target": identity.hf_outputs_equal_to_target(m.records) if cfg.hf else None,
    }


def _failed(records: Sequence[Record]) -> list[dict[str, Any]]:
    return [
        {"set": r.set, "prompt_index": r.prompt_index, "run": r.run, "error": r.error}
        for r in records
        if not r.ok
    ]
