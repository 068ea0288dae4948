"""`specmesh bench spec`: the JSON schema through a real local stack, and the bookkeeping.

The slow test starts the real stack (target, draft, gateway as processes on loopback) with the
target model as its own draft: greedy speculative output must equal target-only output and the
draft's chains are (almost) always accepted, so tau > 1. No timing is asserted (DESIGN section 5).
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def spec_bench():
    from specmesh.cli.bench_spec import _import_bench_spec

    return _import_bench_spec()


def _finite_positive(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_spec_bench_through_the_stack(spec_bench, smollm2_dir, tmp_path) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "Name three colours.", "chat": True}) + "\n", encoding="utf-8")
    code = tmp_path / "code.jsonl"
    code.write_text(
        json.dumps({"prompt": "def add(a, b):\n    return", "chat": False}) + "\n", encoding="utf-8"
    )
    out = tmp_path / "spec.json"
    result = spec_bench.run_spec_bench(
        [chat, code],
        out=out,
        max_new_tokens=8,
        temperature=0.0,
        target_model=MODEL,
        draft_model=MODEL,  # the target drafting for itself, in fp32: its drafts are the target's argmax
        target_threads=1,
        draft_threads=1,
        draft_int8=False,
        compare_lookup=True,
        progress=False,
    )
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["benchmark"] == "spec" and saved["schema_version"] == spec_bench.SCHEMA_VERSION
    assert saved["greedy_identical"] is True and saved["mismatches"] == []
    assert result["greedy_identical"] is True
    assert saved["failed_requests"] == []

    cfg = saved["config"]
    assert cfg["max_new_tokens"] == 8 and cfg["temperature"] == 0.0
    assert cfg["target_model"] == MODEL and cfg["draft_model"] == MODEL
    assert saved["machine"]["threads"]["draft_int8"] is False
    assert saved["machine"]["threads"]["target_weights"] == "fp32"  # the default
    assert cfg["strategies"] == list(spec_bench.STRATEGIES)
    assert cfg["hf"]["threads"] == 1

    m = saved["machine"]
    for key in ("cpu_count", "torch", "transformers", "python", "loadavg_start", "loadavg_end", "threads"):
        assert m[key] is not None, key
    assert m["threads"]["target_threads"] == 1 and m["threads"]["hf_threads"] == 1
    assert m["threads"]["omp_wait_policy"] == "inherit"  # the default
    assert "commit" in m

    spec_runs = []
    for s in spec_bench.STRATEGIES:
        spec_runs += [f"speculative:{s}"] + ([f"speculative:{s}:no-lookup"] if s != "prompt_lookup" else [])
    names = ["target", *spec_runs, "hf_generate", "hf_assisted"]
    assert set(saved["sets"]) == {"chat", "code"}
    for group in [*saved["sets"].values(), saved["overall"]]:
        assert list(group["runs"]) == names
        for name in names:
            s = group["runs"][name]
            assert s["failed"] == 0 and s["output_tokens"] > 0, name
            for key in ("wall_s", "tokens_per_s", "speedup_vs_target", "speedup_vs_target_tokens_per_s"):
                assert _finite_positive(s[key]), (name, key)
            if name != "hf_assisted":
                assert _finite_positive(s["speedup_vs_hf_assisted"]), name
        assert group["runs"]["target"]["tau"] == 1.0
        assert group["runs"]["target"]["speedup_vs_target"] == 1.0
        for s in spec_bench.STRATEGIES:
            run = group["runs"][f"speculative:{s}"]
            assert run["tau"] >= 1.0 and 0.0 <= run["acceptance_rate"] <= 1.0
            if s != "prompt_lookup":  # model-free n-grams need not match anything in 8 tokens
                assert run["tau"] > 1.0, (s, run)
        assert group["runs"]["speculative:chain"]["tau"] > 2.0
        # without the lookup path (whose nodes off the draft's own path are rejected) all is accepted
        chain = group["runs"]["speculative:chain:no-lookup"]
        assert chain["acceptance_rate"] >= 0.9 and chain["tau"] > 2.0
        assert chain["lookup_tokens"] == 0 and group["runs"]["speculative:chain"]["lookup_tokens"] is None
        assert group["runs"]["hf_assisted"]["tokens_per_target_forward"] > 1.0
        best = group["best_speculative"]
        assert best["run"] in names and _finite_positive(best["speedup_vs_hf_assisted"])
        assert group["speedup_vs_target"] == best["speedup_vs_target"]
    assert saved["overall"]["num_prompts"] == 2

    for name, group in saved["sets"].items():
        assert group["num_prompts"] == 1 and len(group["per_prompt"]) == 1
        p = group["per_prompt"][0]
        assert p["chat"] is (name == "chat") and p["prompt_tokens"] > 0
        target_tokens = p["runs"]["target"]["tokens"]
        assert len(target_tokens) == 8 or p["runs"]["target"]["finish_reason"] != "length"
        for s in spec_bench.STRATEGIES:
            assert p["runs"][f"speculative:{s}"]["tokens"] == target_tokens

    if saved["png"]:
        assert (tmp_path / "spec.png").stat().st_size > 0
    else:
        assert saved["png_note"]
    table = spec_bench.format_summary(saved)
    assert "best speculative" in table and "greedy identical: True" in table


# --- fast: bookkeeping on synthetic records ------------------------------------------------------


def test_load_prompt_set(spec_bench, tmp_path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(
        '{"prompt": "a", "chat": true}\n\n{"prompt": "b", "chat": false, "source": "x"}\n"c"\n',
        encoding="utf-8",
    )
    ps = spec_bench.load_prompt_set(f)
    assert ps.name == "p"
    assert [(i.prompt, i.chat) for i in ps.items] == [("a", True), ("b", False), ("c", True)]
    assert ps.items[1].source == "x"
    assert len(spec_bench.load_prompt_set(f, limit=2).items) == 2
    f.write_text('{"prompt": "a", "chat": "yes"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="p.jsonl:1"):
        spec_bench.load_prompt_set(f)
    f.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts"):
        spec_bench.load_prompt_set(f)


def test_summaries_and_mismatches(spec_bench) -> None:
    Record = spec_bench.Record
    runs = spec_bench.plan_runs(["chain"], adaptive=True, draft_policy=False, hf=True)
    assert [r.name for r in runs] == [
        "target",
        "speculative:chain",
        "speculative:chain:adaptive",
        "hf_generate",
        "hf_assisted",
    ]

    def rec(run, i, tokens, wall, rounds=0, drafted=0, accepted=0):
        return Record(run, "s", i, 5, i, 0, tokens, wall, rounds, drafted, accepted)

    records = [
        rec("target", 0, [1, 2, 3, 4], 4.0, rounds=4),
        rec("target", 1, [5, 6], 2.0, rounds=2),
        rec("speculative:chain", 0, [1, 2, 3, 4], 2.0, rounds=2, drafted=4, accepted=2),
        rec("speculative:chain", 1, [5, 6], 1.0, rounds=1, drafted=2, accepted=1),
        rec("speculative:chain:adaptive", 0, [1, 2, 9, 9], 1.0, rounds=1, drafted=4, accepted=3),
        rec("speculative:chain:adaptive", 1, [5, 6], 3.0, rounds=1, drafted=2, accepted=1),
        rec("hf_generate", 0, [1, 2, 3, 4], 8.0, rounds=4),
        rec("hf_generate", 1, [5, 6], 4.0, rounds=2),
        rec("hf_assisted", 0, [1, 2, 3, 4], 4.0, rounds=2),
        rec("hf_assisted", 1, [5, 6], 2.0, rounds=1),
    ]
    group = spec_bench.summarize_group(runs, records)
    chain = group["runs"]["speculative:chain"]
    assert chain["tau"] == pytest.approx((3 + 3) / 3) and chain["acceptance_rate"] == pytest.approx(0.5)
    assert chain["speedup_vs_target"] == pytest.approx(6.0 / 3.0)
    assert chain["speedup_vs_hf_assisted"] == pytest.approx(2.0)
    assert chain["speedup_vs_hf_generate"] == pytest.approx(4.0)
    assert group["runs"]["target"]["tau"] == 1.0
    assert group["runs"]["hf_assisted"]["tokens_per_target_forward"] == pytest.approx(2.0)
    assert group["runs"]["hf_assisted"]["tau"] is None
    assert group["best_speculative"]["run"] == "speculative:chain"
    assert group["speedup_vs_hf_assisted"] == pytest.approx(2.0)

    mism = spec_bench.greedy_mismatches(runs, records)
    assert mism == [
        {
            "set": "s",
            "prompt_index": 0,
            "run": "speculative:chain:adaptive",
            "first_diff_index": 2,
            "target_token": 3,
            "run_token": 9,
            "target_length": 4,
            "run_length": 4,
        }
    ]

    draft_runs = spec_bench.plan_runs([], adaptive=False, draft_policy=True, hf=False)
    assert [r.name for r in draft_runs] == ["target", "draft"]
    alone = spec_bench.summarize(draft_runs[1], [rec("draft", 0, [1, 2], 1.0, drafted=2)])
    assert alone["tau"] is None and alone["acceptance_rate"] is None and alone["drafted_tokens"] == 2

    # a failed request drops out of the pairing instead of skewing the ratio
    records[3].error = "UNAVAILABLE: gone"
    chain = spec_bench.summarize_group(runs, records)["runs"]["speculative:chain"]
    assert chain["failed"] == 1 and chain["speedup_vs_target"] == pytest.approx(4.0 / 2.0)


def test_cli_parses_spec_args() -> None:
    from specmesh.cli import bench_spec

    parser = argparse.ArgumentParser(prog="specmesh bench")
    bench_spec.add_spec_parser(parser.add_subparsers(dest="bench_command"))
    args = parser.parse_args(
        [
            "spec",
            "--prompts",
            "a.jsonl",
            "--prompts",
            "b.jsonl",
            "--out",
            "s.json",
            "--temperature",
            "0.8",
            "--strategies",
            "chain,dynamic-tree",
            "--adaptive",
            "--limit",
            "3",
            "--no-hf",
        ]
    )
    assert args.func is bench_spec.run
    assert [str(p) for p in args.prompts] == ["a.jsonl", "b.jsonl"]
    assert args.strategies == ["chain", "dynamic_tree"] and args.adaptive and args.limit == 3
    assert args.temperature == 0.8 and args.no_hf and args.max_new_tokens == 64 and args.gateway is None
    with pytest.raises(SystemExit):
        parser.parse_args(["spec", "--prompts", "a.jsonl", "--out", "s.json", "--strategies", "beam"])
    with pytest.raises(SystemExit):
        parser.parse_args(["spec", "--prompts", "a.jsonl", "--out", "s.json", "--temperature", "-1"])


def test_identical_fraction_and_mismatch_margins(spec_bench) -> None:
    Record = spec_bench.Record
    runs = spec_bench.plan_runs(["chain", "static_tree"], adaptive=False, draft_policy=False, hf=False)

    def rec(run, i, tokens, error=None):
        r = Record(run, "s", i, 2, i, 0, tokens, 1.0)
        r.error = error
        return r

    records = [
        rec("target", 0, [1, 2, 3]),
        rec("target", 1, [4, 5, 6]),
        rec("target", 2, [7, 8]),
        rec("target", 3, [1], error="UNAVAILABLE: gone"),  # nothing to compare prompt 3 against
        rec("speculative:chain", 0, [1, 2, 3]),
        rec("speculative:chain", 1, [4, 0, 6]),  # differs at 1
        rec("speculative:chain", 2, [7]),  # ended early: no token pair at the divergence
        rec("speculative:chain", 3, [1]),
        rec("speculative:static_tree", 0, [1, 2, 3]),
        rec("speculative:static_tree", 1, [4, 5, 6]),
        rec("speculative:static_tree", 2, [7, 8], error="DEADLINE_EXCEEDED: slow"),
    ]
    identity = spec_bench.greedy_identity(runs, records)
    assert identity == {
        "speculative:chain": {"compared": 3, "identical": 1, "fraction": pytest.approx(1 / 3)},
        "speculative:static_tree": {"compared": 2, "identical": 2, "fraction": 1.0},
    }
    assert spec_bench.identical_fraction(identity) == pytest.approx(3 / 5)

    mismatches = spec_bench.greedy_mismatches(runs, records)
    assert [(m["prompt_index"], m["first_diff_index"]) for m in mismatches] == [(1, 1), (2, 1)]
    prompt_ids = {("s", i): [100 + i, 200 + i] for i in range(4)}
    seen: list[list[int]] = []

    def next_logits(ids: list[int]) -> list[float]:
        seen.append(ids)
        logits = [0.0] * 10
        logits[5], logits[0], logits[9] = 3.0, 2.995, 2.0  # target's 5 leads the draft's 0 by 0.005
        return logits

    spec_bench.add_logit_margins(mismatches, records, prompt_ids, next_logits)
    assert seen == [[101, 201, 4]]  # the prompt and the target's tokens before the divergence
    tie, ended = mismatches
    assert tie["target_top2_margin"] == pytest.approx(0.005)
    assert tie["target_vs_run_logit_gap"] == pytest.approx(0.005) and tie["near_tie"] is True
    assert ended["near_tie"] is None and ended["target_top2_margin"] is None

    # a gap far above rounding error is reported as not a near-tie
    wide = spec_bench.greedy_mismatches(runs, records)[:1]
    spec_bench.add_logit_margins(wide, records, prompt_ids, lambda ids: [1.0, 0, 0, 0, 0, 3.0])
    assert wide[0]["near_tie"] is False and wide[0]["target_vs_run_logit_gap"] == pytest.approx(2.0)

    result = {
        "greedy_identical": False,
        "greedy_identity": identity,
        "mismatches": [tie, wide[0], ended],
        "config": {"temperature": 0.0},
    }
    lines = spec_bench.identity_lines(result)
    assert lines[0] == "  speculative:chain: 1/3 outputs identical (33.3%)"
    assert lines[1] == "  speculative:static_tree: 2/2 outputs identical (100.0%)"
    assert lines[2].startswith("  mismatch s[1] speculative:chain: first difference at token 1 (5 vs 0)")
    assert lines[2].endswith(": near-tie") and lines[3].endswith(": NOT a near-tie")
    assert lines[4].endswith(": no token pair")


def test_hf_next_logits_reads_the_last_position(spec_bench) -> None:
    torch = pytest.importorskip("torch")

    class Out:
        def __init__(self, logits):
            self.logits = logits

    def model(x):  # batch 1: logits[0, j] = [j, ids[j]]
        return Out(torch.stack([torch.arange(x.shape[1]), x[0]], dim=-1)[None].float())

    assert spec_bench.hf_next_logits(model)([7, 8, 9]) == [2.0, 9.0]


def test_config_checks_and_fills_defaults(spec_bench, monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    cfg = spec_bench.SpecBenchConfig(["a.jsonl"], out="o.json", strategies=["Chain", "dynamic-tree", "chain"])
    assert cfg.strategies == ["chain", "dynamic_tree"]
    assert (cfg.target_threads, cfg.draft_threads, cfg.hf_threads) == (6, 6, 6)
    assert cfg.greedy and str(cfg.paths[0]) == "a.jsonl"
    assert spec_bench.SpecBenchConfig(["a"], out="o", target_threads=2).hf_threads == 2
    for bad in (
        {"temperature": -1.0},
        {"max_new_tokens": 0},
        {"omp_wait_policy": "spin"},
        {"strategies": ["beam"]},
    ):
        with pytest.raises(ValueError):
            spec_bench.SpecBenchConfig(["a.jsonl"], out="o.json", **bad)
    with pytest.raises(ValueError, match="no prompt files"):
        spec_bench.SpecBenchConfig([], out="o.json")
