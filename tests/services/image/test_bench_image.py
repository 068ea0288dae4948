"""`specmesh bench image` end to end on the tiny trained models (mechanics, not numbers): every
method's figures, the delta sweep, the JSON and the PNGs next to it.

Here rather than under tests/bench/ because it needs this directory's trained-model fixture."""

from __future__ import annotations

import json

import pytest
import torch

from bench.image.run import ImageBenchConfig, run, summary
from services.image import png


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()  # the benchmark sets its own
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("keep_torch_threads")
def test_bench_writes_every_figure_per_method_and_the_sweep(tiny_image_dir, tmp_path) -> None:
    out = tmp_path / "image.json"
    cfg = ImageBenchConfig(
        n=8,
        batch=4,
        sweep_n=4,
        sweep_deltas=(0.0, 0.4),
        model_dir=str(tiny_image_dir),
        out=str(out),
        progress=False,
    )
    report = run(cfg)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for m in ("ar", "exact_sd", "lantern", "gsd"):
        r = report["methods"][m]
        assert r["images"] == 8 and r["images_per_s"] > 0 and 0 <= r["class_accuracy"] <= 1
        assert r["frechet_distance"] >= 0 and r["mean_accepted_len"] >= 1
        assert png.decode_png((tmp_path / f"image_{m}.png").read_bytes()).ndim == 2
    assert report["methods"]["ar"]["mean_accepted_len"] == 1 and report["methods"]["ar"]["speedup_vs_ar"] == 1
    assert [p["delta"] for p in report["lantern_delta_sweep"]["points"]] == [0.0, 0.4]
    assert {"cpu_model", "cpu_count", "torch_threads", "loadavg_start"} <= set(report["machine"])
    assert "exact_sd" in summary(report)
