"""The router loader of the draft service: backends agree, mismatched or missing routers are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from services.core.errors import FailedPrecondition
from services.draft.router import CONFIG_FILE, ONNX_FILE, default_router_dir, load_router


def _real_features(engine) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [n, H], logits [n, C] and the greedy full-vocabulary tokens of the served draft."""
    seq = engine.new_sequence()
    ids = [1, 9690, 198, 19556, 314, 253, 1345, 30, 2, 198, 504, 2683, 28]
    logits, hidden = (x[0] for x in engine.forward([seq], [ids]))
    seq.release()
    return hidden, logits, engine.vocab_ids[logits.argmax(-1)]


def test_onnx_and_torch_scores_agree_on_real_features(trained_router, served_draft) -> None:
    onnx = load_router(trained_router.router_dir, served_draft, trained_router.draft_dir)
    torch_router = load_router(
        trained_router.router_dir, served_draft, trained_router.draft_dir, backend="torch"
    )
    assert (onnx.backend, torch_router.backend) == ("onnxruntime", "torch")
    assert onnx.threshold == torch_router.threshold == trained_router.config["threshold"]
    hidden, logits, tokens = _real_features(served_draft)
    a, b = onnx.divergence(hidden, logits, tokens), torch_router.divergence(hidden, logits, tokens)
    assert len(a) == len(b) == len(tokens)
    assert all(0.0 <= p <= 1.0 for p in a)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-4
    assert onnx.divergence(hidden[:1], logits[:1], tokens[:1]) == pytest.approx(a[:1], abs=1e-6)  # batch of 1


def test_default_router_dir(tmp_path: Path) -> None:
    assert default_router_dir(tmp_path / "d") == tmp_path / "d" / "router"


def test_refuses_a_missing_router(trained_router, served_draft, tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match=r"does not exist.*specmesh train router --draft") as e:
        load_router(tmp_path / "nowhere", served_draft, trained_router.draft_dir)
    assert f"--out {tmp_path / 'nowhere'}" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FailedPrecondition, match="has no router.json"):
        load_router(empty, served_draft, trained_router.draft_dir)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("hidden_size", 960, "hidden size 960 there, 576"),
        ("draft_digest", "0" * 64, "draft weights digest"),
        ("draft_vocab_size", 16384, "draft vocabulary size"),
        ("format", "specmesh-router/0", "format"),
    ],
)
def test_refuses_a_router_for_another_draft(
    trained_router, served_draft, tmp_path: Path, key: str, value: object, named: str
) -> None:
    other = tmp_path / "router"
    shutil.copytree(trained_router.router_dir, other)
    config = json.loads((other / CONFIG_FILE).read_text())
    (other / CONFIG_FILE).write_text(json.dumps(config | {key: value}))
    with pytest.raises(FailedPrecondition, match=named) as e:
        load_router(other, served_draft, trained_router.draft_dir)
    assert "specmesh train router" in str(e.value)


def test_refuses_a_missing_model_file(trained_router, served_draft, tmp_path: Path) -> None:
    other = tmp_path / "router"
    shutil.copytree(trained_router.router_dir, other)
    (other / ONNX_FILE).unlink()
    with pytest.raises(FailedPrecondition, match="router.onnx is missing"):
        load_router(other, served_draft, trained_router.draft_dir, backend="onnxruntime")
    assert load_router(other, served_draft, trained_router.draft_dir, backend="torch").backend == "torch"
