"""`specmesh train image --if-missing`: the image-init job of compose and the chart trains once.

A complete directory (the tiny models of conftest's `tiny_image_dir`) is left alone and the
command returns at once; a missing or damaged one is trained (the trainer is replaced here by a
recorder, so nothing trains); without the flag the command always trains.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import services.image.training.train as image_train
from services.image.store import DEFAULT_NAME, is_complete
from specmesh.cli.main import main


@pytest.fixture
def trained(tiny_image_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny image models, at the default place under a fresh model root."""
    out = tmp_path / "models" / DEFAULT_NAME
    shutil.copytree(tiny_image_dir, out)
    return out


@pytest.fixture
def trainings(monkeypatch) -> list[Path]:
    """Where train_image would have written (it does not run), with torch's thread count kept."""
    import torch

    calls: list[Path] = []
    monkeypatch.setattr(image_train, "train_image", lambda out, recipe, **kw: calls.append(Path(out)))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    return calls


def test_a_complete_directory_is_not_trained_again(trained, trainings, monkeypatch, capsys) -> None:
    assert is_complete(trained)
    assert main(["train", "image", "--if-missing", "--out", str(trained)]) == 0
    # the default output (<model root>/digits-image) is found the same way
    monkeypatch.setenv("SPECMESH_MODEL_DIR", str(trained.parent))
    assert main(["train", "image", "--if-missing"]) == 0
    assert trainings == []
    out = capsys.readouterr().out
    assert out.count(f"image models already complete: {trained}") == 2


@pytest.mark.parametrize(
    "damage",
    ["missing", "truncated vq", "no draft weights", "no manifest"],
)
def test_a_missing_or_damaged_directory_is_trained(trained, trainings, damage, capsys) -> None:
    if damage == "missing":
        shutil.rmtree(trained)
    elif damage == "truncated vq":
        vq = trained / "vq.safetensors"
        vq.write_bytes(vq.read_bytes()[:-1])
    elif damage == "no draft weights":
        (trained / "draft" / "model.safetensors").unlink()
    else:
        (trained / "manifest.json").unlink()
    assert not is_complete(trained)
    assert main(["train", "image", "--if-missing", "--out", str(trained)]) == 0
    assert trainings == [trained]
    captured = capsys.readouterr()
    assert "already complete" not in captured.out
    assert ("is incomplete" in captured.err) == (damage != "missing")


def test_without_the_flag_it_always_trains(trained, trainings) -> None:
    assert main(["train", "image", "--out", str(trained)]) == 0
    assert trainings == [trained]
