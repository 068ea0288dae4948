"""The decode benchmark runs end to end on the real SmolLM2 weights and writes its JSON schema.

No timing is asserted (DESIGN section 5): only structure, token counts and greedy identity.
"""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def decode_bench():
    from specmesh.cli.bench import _import_bench_decode

    return _import_bench_decode()


@pytest.mark.slow
def test_decode_bench_json(decode_bench, smollm2_dir, tmp_path) -> None:
    out = tmp_path / "decode.json"
    prompts = ["Name three colours.", "def add(a, b):\n    return"]
    result = decode_bench.run_decode_bench(
        str(smollm2_dir), prompts, max_new_tokens=8, repeats=1, out=out, threads=None, progress=False
    )
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["benchmark"] == "decode"
    assert saved["schema_version"] == decode_bench.SCHEMA_VERSION
    assert saved["greedy_identical"] is True and saved["mismatches"] == []
    assert result["greedy_identical"] is True

    cfg = saved["config"]
    assert cfg["max_new_tokens"] == 8 and cfg["repeats"] == 1 and cfg["num_prompts"] == 2
    assert cfg["hf_attn_implementation"] in ("sdpa", "eager")

    machine = saved["machine"]
    for key in ("cpu_count", "torch", "transformers", "torch_threads", "python"):
        assert machine[key] is not None, key
    assert machine["torch_threads"] >= 1

    for name in ("specmesh", "transformers"):
        s = saved["engines"][name]
        assert s["runs"] == 2
        assert s["total_tokens"] == 2 * 8
        assert s["decode_tokens"] == 2 * 7
        for key in (
            "wall_s",
            "decode_s",
            "tokens_per_s_decode",
            "tokens_per_s_decode_best",
            "tokens_per_s_end_to_end",
            "ttft_s_mean",
        ):
            assert isinstance(s[key], float) and math.isfinite(s[key]) and s[key] > 0, (name, key)
    for key in (
        "speedup_vs_hf",
        "speedup_vs_hf_end_to_end",
        "speedup_vs_hf_median_pair",
        "speedup_vs_hf_best_of_repeats",
    ):
        assert isinstance(saved[key], float) and saved[key] > 0

    assert len(saved["per_prompt"]) == 2
    for p in saved["per_prompt"]:
        assert p["generated_tokens"] == 8
        assert p["greedy_identical"] is True and p["deterministic_across_repeats"] is True
        assert p["prompt_tokens"] > 0 and isinstance(p["text"], str)
    assert len(saved["runs"]) == 4
    assert {r["order"] for r in saved["runs"]} == {0, 1}

    llama = saved["llama_cpp"]  # llama.cpp's native decode where a llama-bench is built, else why not
    if llama["available"]:
        assert llama["tokens_per_s_decode"] > 0 and saved["speedup_vs_llama_cpp"] > 0
    else:
        assert "llama-bench" in llama["why"]

    if saved["png"]:
        assert saved["png"].endswith(".png") and (tmp_path / "decode.png").stat().st_size > 0
    else:
        assert saved["png_note"]


def test_prompts_file(decode_bench, tmp_path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('"plain string"\n\n{"prompt": "from an object"}\n{"text": "text key"}\n', encoding="utf-8")
    assert decode_bench.load_prompts_file(f) == ["plain string", "from an object", "text key"]
    f.write_text('{"other": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="p.jsonl:1"):
        decode_bench.load_prompts_file(f)


def test_cli_parses_decode_args() -> None:
    import argparse

    from specmesh.cli import bench

    parser = argparse.ArgumentParser(prog="specmesh")
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["bench", "decode", "--out", "x.json", "--max-new-tokens", "16", "--repeats", "2", "--threads", "1"]
    )
    assert args.func is bench.run_decode
    assert (args.model, args.max_new_tokens, args.repeats, args.threads) == (
        "smollm2-135m-instruct",
        16,
        2,
        1,
    )
    assert args.prompts is None and args.hf_attn == "sdpa"
