"""GGUF and HF-directory loaders: layout permutation, names, config, errors, real-weight parity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from services.core.config import LlamaConfig
from services.core.errors import InvalidArgument, NotFound
from services.core.loaders.gguf import read_gguf, rope_permute, rope_unpermute
from services.core.loaders.hf_dir import expected_shapes, load_hf_dir

# --- q/k row permutation -----------------------------------------------------------------------


@pytest.mark.parametrize(("n_head", "head_dim", "d_in"), [(9, 64, 576), (3, 64, 576), (4, 16, 8), (1, 2, 3)])
def test_unpermute_inverts_permute(n_head: int, head_dim: int, d_in: int) -> None:
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, d_in)).astype(np.float32)
    np.testing.assert_array_equal(rope_unpermute(rope_permute(w, n_head), n_head), w)
    np.testing.assert_array_equal(rope_permute(rope_unpermute(w, n_head), n_head), w)


def test_permute_matches_llamacpp_pairing(llamacpp_interleave) -> None:
    # An independent loop formulation: rotate_half pairs (j, j + hd/2) become adjacent rows.
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    np.testing.assert_array_equal(rope_permute(w, 4), llamacpp_interleave(w, 4))
    np.testing.assert_array_equal(rope_unpermute(llamacpp_interleave(w, 4), 4), w)


# --- tiny synthetic GGUF -----------------------------------------------------------------------


@pytest.mark.parametrize("untied", [False, True])
def test_tiny_gguf_roundtrip(tiny_gguf, untied: bool) -> None:
    t = tiny_gguf(untied=untied)
    m = read_gguf(t.path, progress=False)
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (t.n_layers, t.hidden, t.ffn)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        t.n_head,
        t.n_kv,
        t.hidden // t.n_head,
    )
    assert c.rms_norm_eps == 1e-5 and c.rope_theta == 10000.0 and c.max_position_embeddings == 256
    assert c.tie_word_embeddings is not untied
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    assert (m.bos_token, m.eos_token, m.pad_token, m.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert m.chat_template and "<|im_start|>" in m.chat_template
    assert set(m.state_dict) == set(t.state_dict) == set(expected_shapes(c))
    for k, ref in t.state_dict.items():
        got = m.state_dict[k]
        assert got.dtype == torch.float32 and got.is_contiguous(), k
        np.testing.assert_array_equal(got.numpy(), ref, err_msg=k)


def test_tiny_gguf_tokenizer(tiny_gguf) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(read_gguf(tiny_gguf().path, progress=False).tokenizer_json)
    enc = tok.encode("<|im_start|> the 42 in")
    assert enc.tokens == ["<|im_start|>", "Ġthe", "Ġ", "4", "2", "Ġin"]  # digits split one by one
    assert tok.decode(enc.ids, skip_special_tokens=True) == " the 42 in"
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|> the 42 in"


def test_non_llama_architecture_rejected(tiny_gguf) -> None:
    with pytest.raises(InvalidArgument) as e:
        read_gguf(tiny_gguf(arch="gemma3").path, progress=False)
    assert e.value.field == "general.architecture" and "gemma3" in e.value.message


@pytest.mark.parametrize(
    "key",
    ["llama.block_count", "llama.attention.head_count", "tokenizer.ggml.tokens", "tokenizer.ggml.model"],
)
def test_missing_metadata_rejected(tiny_gguf, key: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        read_gguf(tiny_gguf(skip_keys=(key,)).path, progress=False)
    assert e.value.field == key


def test_missing_tensor_rejected(tiny_gguf) -> None:
    with pytest.raises(InvalidArgument) as e:
        read_gguf(tiny_gguf(skip_tensors=("blk.1.ffn_up.weight",)).path, progress=False)
    assert "model.layers.1.mlp.up_proj.weight" in e.value.message


def test_not_a_gguf_file(tmp_path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(InvalidArgument) as e:
        read_gguf(bad)
    assert e.value.field == "path"
    with pytest.raises(InvalidArgument):
        read_gguf(tmp_path / "missing.gguf")


# --- HF directories ----------------------------------------------------------------------------

TINY_CFG = LlamaConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _write_dir(path, cfg=TINY_CFG, shards: int = 1, drop=(), extra=None):
    path.mkdir(parents=True, exist_ok=True)
    cfg.save(path)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in expected_shapes(cfg).items() if k not in drop}
    state.update(extra or {})
    keys = sorted(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[i::shards]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return state


@pytest.mark.parametrize("shards", [1, 3])
def test_load_hf_dir(tmp_path, shards: int) -> None:
    state = _write_dir(tmp_path / "m", shards=shards)
    cfg, loaded = load_hf_dir(tmp_path / "m")
    assert cfg == TINY_CFG
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    _, half = load_hf_dir(tmp_path / "m", dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in half.values())


def test_load_hf_dir_tied_head_and_buffers_dropped(tmp_path) -> None:
    extra = {
        "lm_head.weight": torch.zeros(32, 16),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(2),
    }
    _write_dir(tmp_path / "m", extra=extra)
    _, loaded = load_hf_dir(tmp_path / "m")
    assert "lm_head.weight" not in loaded and not any("inv_freq" in k for k in loaded)


def test_load_hf_dir_reports_missing_unexpected_and_shapes(tmp_path) -> None:
    _write_dir(
        tmp_path / "m",
        drop=("model.layers.1.mlp.up_proj.weight",),
        extra={"model.layers.0.bogus.weight": torch.zeros(1), "model.norm.weight": torch.zeros(17)},
    )
    with pytest.raises(InvalidArgument) as e:
        load_hf_dir(tmp_path / "m")
    msg = e.value.message
    assert "missing keys: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected keys: model.layers.0.bogus.weight" in msg
    assert "model.norm.weight: got (17,), config implies (16,)" in msg
    assert e.value.field == "state_dict"


def test_load_hf_dir_non_strict_drops_unexpected(tmp_path) -> None:
    _write_dir(tmp_path / "m", extra={"model.layers.0.bogus.weight": torch.zeros(1)})
    _, loaded = load_hf_dir(tmp_path / "m", strict=False)
    assert "model.layers.0.bogus.weight" not in loaded


def test_load_hf_dir_missing_files(tmp_path) -> None:
    with pytest.raises(NotFound):
        load_hf_dir(tmp_path)
    TINY_CFG.save(tmp_path)
    with pytest.raises(NotFound, match="safetensors"):
        load_hf_dir(tmp_path)


# --- the real SmolLM2 file -----------------------------------------------------------------------


@pytest.mark.slow
def test_real_gguf_config() -> None:
    from services.core.model_import import find_smollm2_gguf

    m = read_gguf(find_smollm2_gguf(), progress=False)
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert (c.vocab_size, c.max_position_embeddings, c.rope_theta, c.rms_norm_eps) == (
        49152,
        8192,
        100000.0,
        1e-5,
    )
    assert c.tie_word_embeddings and "lm_head.weight" not in m.state_dict
    assert (c.bos_token_id, c.eos_token_id) == (1, 2) and m.eos_token == "<|im_end|>"
    assert sum(v.numel() for v in m.state_dict.values()) == 134_515_008


@pytest.mark.slow
def test_imported_dir_loads_in_transformers_with_identical_weights(smollm2_dir) -> None:
    from transformers import LlamaForCausalLM

    cfg, ours = load_hf_dir(smollm2_dir)
    hf = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    hf_state = hf.state_dict()
    assert (
        hf.config.tie_word_embeddings
        and hf_state["lm_head.weight"].data_ptr() == hf_state["model.embed_tokens.weight"].data_ptr()
    )
    for k, v in ours.items():
        assert torch.equal(hf_state[k], v), k
    assert hf.config.num_key_value_heads == cfg.num_key_value_heads == 3


@pytest.mark.slow
def test_real_model_answers_sensibly(smollm2_dir) -> None:
    # End-to-end check of weights, q/k layout, tokenizer and template: a wrong permutation
    # or vocabulary turns this answer into noise.
    from transformers import LlamaForCausalLM

    from services.core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm2_dir)
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids) :].tolist())
