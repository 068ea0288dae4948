"""Fixtures of the CLI tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tiny_gguf, tmp_path_factory) -> str:
    """A tiny random model imported into a store of its own: the scoring commands run in-process on it."""
    from services.core import model_import as mi

    root = tmp_path_factory.mktemp("cli-model")
    return str(mi.import_gguf(tiny_gguf().path, "tiny", root=root, progress=False))
