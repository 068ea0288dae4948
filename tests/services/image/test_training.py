"""`specmesh train image` output: a complete, verifiable model directory the engine loads."""

from __future__ import annotations

import hashlib
import json

from services.core.engine import Engine
from services.image.store import load_image_models


def test_the_model_directory_is_complete_and_its_manifest_verifies(tiny_image_dir) -> None:
    manifest = json.loads((tiny_image_dir / "manifest.json").read_text())
    for name in (
        "image.json",
        "vq.safetensors",
        "judge.safetensors",
        "train_report.json",
        "ar/manifest.json",
    ):
        meta = manifest["files"][name]
        assert hashlib.sha256((tiny_image_dir / name).read_bytes()).hexdigest() == meta["sha256"]
    report = json.loads((tiny_image_dir / "train_report.json").read_text())
    assert set(report) >= {"vq", "judge", "ar", "draft", "data", "recipe"}
    assert 0 < report["vq"]["codes_used"] <= 32 and report["vq"]["test_mse"] > 0
    assert report["data"]["train"]["count"] == 1438
    models = load_image_models(tiny_image_dir)
    engine = Engine.from_dir(models.target_dir)
    assert engine.config.vocab_size == models.layout.vocab_size == 32 + 11
