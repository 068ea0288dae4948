"""bench.gpu, the GPU check of the kernels, runs end to end on CPU (--dry-run: tiny shapes,
Triton's interpreter) and writes the JSON its closing-note table comes from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_checks_every_kernel_and_writes_json(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--dry-run", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["machine"]["cpu_model"] is not None
    assert set(result["correctness"]) == {
        "tree_attention_float32",
        "tree_attention_bfloat16",
        "fused_sampling",
        "h2o_accumulate",
    }
    assert all(r["ok"] for r in result["correctness"].values())
    for row in result["tree_attention"]:
        assert row["triton_s"] > 0 and row["sdpa_masked_s"] > 0 and row["bandwidth_floor_fraction"] > 0
    assert {r["kernel"] for r in result["small_kernels"]} == {"fused_sampling", "h2o_accumulate"}
    assert "tree_attention_bfloat16" in proc.stdout  # the printed table


def test_without_cuda_it_asks_for_the_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from bench.gpu import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exit_:
        main(["--out", "unused.json"])
    assert exit_.value.code == 2 and "--dry-run" in capsys.readouterr().err
