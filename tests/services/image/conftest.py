"""A tiny image model directory trained once per session by the real recipe (seconds: few steps,
small sizes). Tests check mechanics with it, not image quality (the benchmark measures that)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Run in a fresh process at one OpenMP thread: inside a pytest process whose torch already ran
# multi-threaded ops, the same few hundred small convolutions and backward passes measured 4-15x
# slower (6 s alone, 28-106 s in-process on a loaded 2-core machine).
TRAIN = """
import sys
from pathlib import Path
from services.image.training.recipe import ImageRecipe
from services.image.training.train import train_image

recipe = ImageRecipe(
    vq_steps=20, judge_steps=20, ar_steps=20, draft_steps=20, batch=16, codebook_size=32,
    vq_channels=8, target_hidden=64, target_layers=2, draft_hidden=32, draft_layers=1,
)
train_image(Path(sys.argv[1]), recipe, progress=False, log=lambda _: None)
"""


@pytest.fixture(scope="session")
def tiny_image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("image") / "tiny-image"
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    subprocess.run([sys.executable, "-c", TRAIN, str(out)], check=True, env=env, cwd=repo, timeout=600)
    return out
