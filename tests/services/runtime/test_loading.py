"""load_engine bounds oneDNN's primitive cache unless the environment already does."""

from __future__ import annotations

import pytest

from services.runtime import loading


@pytest.fixture(scope="module")
def tiny_dir(tiny_gguf, tmp_path_factory) -> str:
    from services.core import model_import as mi

    root = tmp_path_factory.mktemp("loading")
    return str(mi.import_gguf(tiny_gguf().path, "tiny", root=root, progress=False))


@pytest.mark.parametrize("preset", [None, "256"])
def test_the_onednn_cache_bound(tiny_dir, monkeypatch, preset) -> None:
    if preset is None:
        monkeypatch.delenv(loading.ONEDNN_CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(loading.ONEDNN_CACHE_ENV, preset)
    loaded = loading.load_engine(tiny_dir, threads=1, max_kv_tokens=256, pack_weights=False)
    try:
        expected = preset or loading.ONEDNN_CACHE_CAPACITY
        assert loading.os.environ[loading.ONEDNN_CACHE_ENV] == expected
    finally:
        loaded.worker.close()
