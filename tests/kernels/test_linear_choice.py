"""kernels.linear_choice: plans measured per weight shape and row bucket, the cache next to
the model, and every forced path giving the same numbers through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_config

import kernels.linear_choice as choice_mod
from kernels.linear import (
    BUCKET_ROWS,
    PATHS,
    default_plan,
    linear,
    linear_reference,
    prepare_packed,
    row_bucket,
)
from kernels.linear_choice import choose_plans, machine_key, measure_shape
from services.core.engine import Engine

SHAPES = [(40, 24), (72, 24)]


def test_buckets_cover_every_row_count() -> None:
    assert [row_bucket(r) for r in (1, 2, 3, 4, 5, 64, 65, 1000)] == [0, 1, 2, 2, 3, 6, 7, 7]
    assert len(default_plan(True)) == len(default_plan(False)) == len(BUCKET_ROWS)


@pytest.mark.parametrize("path", PATHS)
def test_a_plan_forcing_any_path_matches_the_reference_at_every_bucket(path: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 48)
    packed = prepare_packed(w)
    if path == "packed" and packed is None:
        pytest.skip("oneDNN is not available")
    plan = (path,) * len(BUCKET_ROWS)
    for rows in (*BUCKET_ROWS, 3, 100):
        x = torch.randn(2, rows, 48)
        assert (linear(x, w, packed, plan=plan) - linear_reference(x, w)).abs().max() <= 1e-4


def test_measurement_times_every_candidate_and_picks_one_of_them() -> None:
    choice = measure_shape(64, 32, packed=True)
    assert len(choice.plan) == len(choice.timings_us) == len(BUCKET_ROWS)
    for winner, timings in zip(choice.plan, choice.timings_us, strict=True):
        assert winner in timings and all(t > 0 for t in timings.values())
        assert set(timings) == (
            {"linear", "mm_t", "packed"}
            if prepare_packed(torch.ones(2, 2)) is not None
            else {"linear", "mm_t"}
        )
        assert timings[winner] <= (1 + choice_mod.MARGIN) * min(timings.values()) + 1e-9


def test_plans_are_cached_per_machine_and_a_bad_cache_is_remeasured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / ".linear_choice.json"
    first, source = choose_plans(SHAPES, True, cache)
    assert source == "measured" and cache.exists()
    again, source = choose_plans(SHAPES, True, cache)
    assert source == "cache" and {s: c.plan for s, c in again.items()} == {
        s: c.plan for s, c in first.items()
    }
    assert any(machine_key() in key for key in json.loads(cache.read_text()))
    monkeypatch.setattr(choice_mod, "cpu_model", lambda: "another CPU")  # another machine, same file
    _, source = choose_plans(SHAPES, True, cache)
    assert source == "measured" and len(json.loads(cache.read_text())) == 2
    cache.write_text("{not json")
    _, source = choose_plans(SHAPES, True, cache)
    assert source == "measured"


def test_an_unwritable_cache_only_costs_a_measurement(tmp_path: Path) -> None:
    missing_dir = tmp_path / "absent" / ".linear_choice.json"
    choices, source = choose_plans(SHAPES[:1], False, missing_dir)
    assert source == "measured" and set(choices) == {SHAPES[0]} and not missing_dir.exists()


def _greedy_and_logits(engine: Engine) -> tuple[list[int], list[torch.Tensor]]:
    seq = engine.new_sequence()
    logits = [engine.prefill(seq, [3, 8, 1, 44, 9, 17, 5, 60, 2, 11])]
    tokens = []
    for _ in range(6):
        tokens.append(int(logits[-1].argmax()))
        logits.append(engine.decode(seq, tokens[-1]))
    logits.append(engine.extend(seq, list(range(20, 40))))  # a 20-row forward: another bucket
    seq.release()
    return tokens, logits


def test_every_forced_path_gives_the_engine_the_same_numbers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    engine = Engine.from_config(tiny_config(), seed=3)
    engine.pack_weights()
    monkeypatch.setenv("SPECMESH_LINEAR_PATH", "default")
    assert engine.choose_linear_paths()["source"] == "default"
    ref_tokens, ref_logits = _greedy_and_logits(engine)
    for path in PATHS:
        monkeypatch.setenv("SPECMESH_LINEAR_PATH", path)
        assert engine.choose_linear_paths()["source"] == path
        tokens, logits = _greedy_and_logits(engine)
        assert tokens == ref_tokens, path
        assert max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits, strict=True)) <= 1e-4, path
    monkeypatch.setenv("SPECMESH_LINEAR_PATH", "auto")
    measured = engine.choose_linear_paths(tmp_path / ".linear_choice.json")
    assert measured["source"] == "measured" and set(measured["plans"]) == {
        "80x48",
        "48x48",
        "160x48",
        "48x80",
        "97x48",
    }
    assert _greedy_and_logits(engine)[0] == ref_tokens
    monkeypatch.setenv("SPECMESH_LINEAR_PATH", "fastest")
    with pytest.raises(ValueError, match="SPECMESH_LINEAR_PATH"):
        engine.choose_linear_paths()
