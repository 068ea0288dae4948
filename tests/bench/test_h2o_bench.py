"""`specmesh bench h2o` end to end on a tiny imported model and short real texts: JSON with
every budget, the full cache as the baseline, and the CLI's summary."""

from __future__ import annotations

import json
from pathlib import Path

from bench.h2o import STDLIB, run_h2o_bench
from services.core.model_import import import_gguf
from specmesh.cli.main import main


def test_h2o_bench_reports_every_budget_against_the_full_cache(tiny_gguf, tmp_path: Path, capsys) -> None:
    import_gguf(tiny_gguf().path, "tiny", root=tmp_path / "models", progress=False)
    texts = [STDLIB / "textwrap.py", STDLIB / "bisect.py"]
    out = tmp_path / "h2o.json"
    result = run_h2o_bench(str(tmp_path / "models" / "tiny"), out, texts=texts, tokens=40, progress=False)
    data = json.loads(out.read_text())
    assert set(data["budgets"]) == {"100%", "50%", "20%", "10%"} and len(data["per_text"]) == 2
    assert data["budgets"]["100%"]["ppl_rel_increase"] == 0.0
    assert data["budgets"]["10%"]["budget_tokens"] == 4 and data["machine"]["cpu_model"]
    assert all(r["ppl"] > 1 for r in data["budgets"].values())
    assert result["png"] is None or Path(result["png"]).is_file()
    code = main(["bench", "h2o", "--model", str(tmp_path / "models" / "tiny"), "--out", str(out),
                 "--texts", *map(str, texts), "--tokens", "20", "--no-png", "--no-progress"])  # fmt: skip
    assert code == 0 and "baseline" in capsys.readouterr().out
