"""The llama.cpp baseline of bench decode: finding llama-bench, checking that the GGUF is the one
the model store imported, and reading llama-bench's JSON (a file it wrote on this project's
benchmark machine, its per-sample lists left out: tests/bench/data/llama_bench.json). llama-bench
itself is an optional build (bench/tools/build_llama_bench.sh), so CI runs it only where one is
installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import llama_cpp

DATA = Path(__file__).parent / "data" / "llama_bench.json"


def test_results_of_a_real_llama_bench_run() -> None:
    r = llama_cpp.parse_results(json.loads(DATA.read_text()))
    assert r["decode_tokens"] == 64 and r["prefill_tokens"] == 64
    assert r["tokens_per_s_decode"] > 0 and r["tokens_per_s_prefill"] > r["tokens_per_s_decode"]
    assert r["tokens_per_s_decode_stddev"] >= 0 and r["n_threads"] >= 1 and r["cpu_info"]
    with pytest.raises(ValueError, match="no text-generation"):
        llama_cpp.parse_results([e for e in json.loads(DATA.read_text()) if e["n_gen"] == 0])


def test_find_prefers_the_explicit_path_then_the_environment(tmp_path, monkeypatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    monkeypatch.setenv(llama_cpp.ENV_BINARY, str(b))
    assert llama_cpp.find_llama_bench(str(a)) == str(a)
    assert llama_cpp.find_llama_bench(str(tmp_path / "missing")) == str(b)
    b.chmod(0o644)  # not executable: skipped
    assert llama_cpp.find_llama_bench() != str(b)


def test_the_gguf_must_be_the_one_the_weights_came_from(tmp_path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF not these weights")
    (model / "config.json").write_text(json.dumps({"specmesh": {"gguf_sha256": "0" * 64}}))
    path, why = llama_cpp.source_gguf(model, other)
    assert path is None and "is not the GGUF model was imported from" in why
    digest = llama_cpp._sha256(other)
    (model / "config.json").write_text(json.dumps({"specmesh": {"gguf_sha256": digest}}))
    assert llama_cpp.source_gguf(model, other) == (other, "same GGUF as the model store's weights")


@pytest.mark.slow
def test_the_shipped_gguf_is_found_for_the_default_model(smollm2_dir) -> None:
    path, why = llama_cpp.source_gguf(smollm2_dir)
    assert path is not None and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf", why


@pytest.mark.slow
@pytest.mark.skipif(llama_cpp.find_llama_bench() is None, reason="no llama-bench built")
def test_a_real_llama_bench_run(smollm2_dir) -> None:
    path, _ = llama_cpp.source_gguf(smollm2_dir)
    r = llama_cpp.run_llama_bench(
        llama_cpp.find_llama_bench(), path, threads=1, n_gen=8, n_prompt=8, repetitions=1
    )
    assert r["decode_tokens"] == 8 and r["tokens_per_s_decode"] > 0 and "-t 1" in r["command"]


def test_decode_bench_refuses_a_missing_binary_before_running(tmp_path, capsys) -> None:
    from specmesh.cli.main import main

    argv = ["bench", "decode", "--out", str(tmp_path / "d.json"), "--llama-bench", str(tmp_path / "nope")]
    assert main(argv) == 2
    assert "not an executable file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d.json")
