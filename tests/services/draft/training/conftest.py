"""Fixtures shared by the draft-training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core import model_import as mi


@pytest.fixture
def tiny_target(tiny_gguf, tmp_model_root: Path) -> Path:
    """A tiny random Llama (with tokenizer) imported as `tiny` into a temporary model store."""
    return mi.import_gguf(tiny_gguf().path, "tiny", progress=False, source="test", license="apache-2.0")
