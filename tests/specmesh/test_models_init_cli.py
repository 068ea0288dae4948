"""`specmesh models init`: the model-init job of compose and the chart builds what is missing."""

from __future__ import annotations

import specmesh.stack
from specmesh.cli.main import main


def test_models_init_builds_the_default_models(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("SPECMESH_MODEL_DIR", str(tmp_path))
    calls: list[float] = []
    monkeypatch.setattr(specmesh.stack, "ensure_default_models", calls.append)
    assert main(["models", "init", "--draft-minutes", "0.5"]) == 0
    assert calls == [0.5]
    assert str(tmp_path) in capsys.readouterr().out
