"""`specmesh bench attribute`'s report on made-up records (the full run starts a SmolLM2 scoring
service and takes minutes: `specmesh bench attribute`, not the test suite)."""

from __future__ import annotations

import pytest
from scipy.stats import wilcoxon

from bench import attribute as bench


def record(reagent: float | None, grad: float | None, rand: float | None, steps: int = 3) -> dict:
    def row(v: float | None) -> dict:
        return {
            "soft_sufficiency": v,
            "soft_comprehensiveness": v,
            "wall_s": 2.0,
            "service_s": 1.5,
            "steps": [steps, 0],
            "stopped": [True, False],
        }

    return {"methods": {"reagent": row(reagent), "gradient_x_input": row(grad), "random": row(rand)}}


def test_paired_comparison() -> None:
    records = [record(0.5, 0.2, 0.1), record(0.4, 0.3, 0.4), record(0.9, 0.1, None), record(None, 0.2, 0.2)]
    records += [record(0.3 + 0.01 * i, 0.1, 0.2) for i in range(8)]
    t = bench.paired(records, "soft_comprehensiveness", "gradient_x_input")
    diffs = [0.3, 0.1, 0.8] + [0.2 + 0.01 * i for i in range(8)]  # the prompt without ReAGent is left out
    assert t["prompts"] == 11 and t["mean_diff"] == pytest.approx(sum(diffs) / 11)
    assert t["mean_diff_ci95"][0] < t["mean_diff"] < t["mean_diff_ci95"][1]
    assert t["reagent_ahead"] == 11 and t["wilcoxon_p"] == pytest.approx(wilcoxon(diffs).pvalue)
    assert bench.paired(records, "soft_sufficiency", "random")["prompts"] == 10
    same = bench.paired([record(0.2, 0.2, 0.2)] * 3, "soft_sufficiency", "random")
    assert same["wilcoxon_p"] == 1.0 and same["ties"] == 3


def test_summary_and_its_text() -> None:
    records = [record(0.5, 0.2, 0.1), record(0.3, 0.2, None)]
    s = bench.method_summary(records, "reagent")
    assert s["soft_sufficiency"] == pytest.approx(0.4) and s["soft_sufficiency_prompts"] == 2
    assert s["mean_steps"] == pytest.approx(1.5) and s["stopped_share"] == 0.5
    assert bench.method_summary(records, "random")["soft_comprehensiveness_prompts"] == 1
    result = {
        "config": {"prompt_count": 2, "max_new_tokens": 2, "model": "m", "replacement_model": "d"},
        "methods": {m: bench.method_summary(records, m) for m in bench.METHODS},
        "reagent_vs": {b: {k: bench.paired(records, k, b) for k in bench.METRICS} for b in bench.BASELINES},
        "machine": {"cpu_model": "cpu", "loadavg_start": [1.0], "loadavg_end": [1.0]},
    }
    text = bench.format_summary(result)
    assert "reagent" in text and "ReAGent - random soft_comprehensiveness" in text and "cpu" in text
