"""bench membership: the statistics on scores whose answer is known, then the whole benchmark
through real scoring-service processes on a tiny model fine-tuned on known members."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import membership as bench
from specmesh.cli.main import main


def _scores(rng: np.random.Generator, n: int, shift: dict[str, float]) -> list[dict[str, float]]:
    return [{m: float(rng.normal(shift.get(m, 0.0))) for m in ("loss", "min_k", "dc_pdd")} for _ in range(n)]


def test_summary_finds_the_method_that_separates() -> None:
    rng = np.random.default_rng(0)
    members = _scores(rng, 150, {"min_k": 1.5, "loss": 0.7})
    nonmembers = _scores(rng, 150, {})
    s = bench.summarise(members, nonmembers, bootstrap=300)
    assert list(s["methods"]) == ["loss", "min_k", "dc_pdd"]  # METHOD_ORDER
    assert s["methods"]["min_k"]["auroc"] > 0.8 and abs(s["methods"]["dc_pdd"]["auroc"] - 0.5) < 0.1
    lo, hi = s["methods"]["min_k"]["auroc_95ci"]
    assert lo < s["methods"]["min_k"]["auroc"] < hi
    assert s["dc_pdd_vs_min_k"]["verdict"] == "Min-K% beats DC-PDD"
    assert s["dc_pdd_vs_min_k"]["difference_95ci"][1] < 0

    # the same statistic on two methods that separate equally finds no difference
    members = _scores(rng, 150, {"min_k": 1.0, "dc_pdd": 1.0})
    tied = bench.summarise(members, _scores(rng, 150, {}), bootstrap=300)
    assert tied["dc_pdd_vs_min_k"]["verdict"] == "no significant difference"


def test_bootstrap_resamples_are_paired_across_methods() -> None:
    x = np.arange(20.0)
    same = bench.bootstrap_aurocs({"a": x, "b": x}, {"a": x - 5, "b": x - 5}, n=50)
    np.testing.assert_array_equal(same["a"], same["b"])


@pytest.mark.slow
def test_the_benchmark_on_a_tiny_fine_tuned_model(tiny_gguf, tmp_path, capsys) -> None:
    from services.core import model_import as mi
    from services.core.tokenizer import Tokenizer
    from services.draft.training.membership import MembershipRecipe, cut_text, train_membership_model
    from services.scoring.convert import start_token_id

    base = mi.import_gguf(tiny_gguf().path, "tiny", root=tmp_path / "store", progress=False)
    tokenizer = Tokenizer.from_dir(base)
    lines = [json.loads(line)["prompt"] for line in Path("bench/prompts/chat.jsonl").read_text().splitlines()]
    texts = [cut_text(tokenizer, t, 24) for t in lines[:24]]
    recipe = MembershipRecipe(epochs=12, lr=3e-3, batch=4, max_tokens=24)
    model = train_membership_model(
        base, texts[:12], texts[12:], tmp_path / "m", start_token_id(tokenizer), recipe, progress=False
    )
    out = tmp_path / "membership.json"
    argv = ["bench", "membership", "--model", str(model), "--out", str(out), "--bootstrap", "200"]
    assert main([*argv, "--no-progress", "--no-png"]) == 0
    printed = capsys.readouterr().out
    assert "finetuned (" in printed and "base (" in printed
    r = json.loads(out.read_text())
    assert r["config"]["base_model"] == str(base) and r["config"]["members"] == 12
    assert "cpu_model" in r["machine"]
    # the tiny tokenizer has no DC-PDD table: the methods the service answers are reported
    assert set(r["finetuned"]["methods"]) == {"loss", "min_k", "min_k_plus_plus"}
    # the fine-tuned model separates its members; the base, which saw neither side, does less well
    assert r["finetuned"]["methods"]["loss"]["auroc"] > 0.9
    assert r["finetuned"]["methods"]["min_k"]["auroc"] > r["base"]["methods"]["min_k"]["auroc"]
    assert len(r["scores"]["finetuned"]["members"]) == 12


def test_cli_refuses_a_model_without_member_files(tmp_path, capsys) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert main(["bench", "membership", "--model", str(tmp_path), "--out", str(tmp_path / "o.json")]) == 2
    assert "has no members.jsonl" in capsys.readouterr().err
