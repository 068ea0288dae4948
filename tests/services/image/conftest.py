"""A tiny image model directory trained once per session by the real recipe (seconds: few steps,
small sizes). Tests check mechanics with it, not image quality (the benchmark measures that)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:

    from services.image.training.recipe import ImageRecipe
    from services.image.training.train import train_image

    recipe = ImageRecipe(
        vq_steps=20,
        judge_steps=20,
        ar_steps=20,
        draft_steps=20,
        batch=16,
        codebook_size=32,
        vq_channels=8,
        target_hidden=64,
        target_layers=2,
        draft_hidden=32,
        draft_layers=1,
    )
    return train_image(
        tmp_path_factory.mktemp("image") / "tiny-image", recipe, progress=False, log=lambda _: None
    )
