"""Load a Llama-family HF checkpoint directory (config.json + safetensors, single or sharded).

This is the production path for user-supplied models (1B-70B pairs) as well as for the
directories our own model store writes, so it validates names and shapes against the
config up front: a wrong checkpoint should fail here with a list of keys, not later
with a shape error deep inside a forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from services.core.config import LlamaConfig
from services.core.errors import InvalidArgument, NotFound
from services.core.quant import Q4_FILE

# Buffers some exporters save that carry no learned weights; safe to drop.
_IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF Llama parameter name the config implies, with its torch shape."""
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    assert hd is not None  # LlamaConfig.__post_init__ fills it
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q_out, h),
                p + "self_attn.k_proj.weight": (kv_out, h),
                p + "self_attn.v_proj.weight": (kv_out, h),
                p + "self_attn.o_proj.weight": (h, q_out),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    return shapes


def _preview(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def validate_state_dict(cfg: LlamaConfig, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Raise InvalidArgument naming missing keys, unexpected keys (if strict) and shape mismatches."""
    want = expected_shapes(cfg)
    missing = sorted(want.keys() - state.keys())
    unexpected = sorted(state.keys() - want.keys())
    bad = [
        f"{k}: got {tuple(state[k].shape)}, config implies {want[k]}"
        for k in sorted(want.keys() & state.keys())
        if tuple(state[k].shape) != want[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if bad:
        problems.append(f"shape mismatches: {_preview(bad, 4)}")
    if problems:
        raise InvalidArgument(
            "checkpoint does not match config.json; " + "; ".join(problems), field="state_dict"
        )


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidArgument(f"{index} has no weight_map", field="model_dir")
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise NotFound(
                f"shards listed in {index.name} are missing: {_preview(absent)}", field="model_dir"
            )
        return files
    # The 4-bit copy of a GGUF import (services.core.quant) is another format, loaded on request.
    files = sorted(f for f in model_dir.glob("*.safetensors") if f.name != Q4_FILE)
    if not files:
        raise NotFound(f"no *.safetensors files in {model_dir}", field="model_dir")
    return files


def load_hf_dir(
    model_dir: str | Path,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Read config + weights onto `device`; cast floating tensors to `dtype` if given.

    With a tied config a stray `lm_head.weight` is dropped (some exporters save the
    duplicate); `strict=False` tolerates other unexpected keys (they are dropped too).
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise NotFound(f"{model_dir} has no config.json (not a HF model directory)", field="model_dir")
    raw = json.loads((model_dir / "config.json").read_text())
    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
        raise InvalidArgument(
            f"unsupported model_type {model_type!r}; only 'llama' is supported", field="model_type"
        )
    cfg = LlamaConfig.from_hf_dict(raw)

    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(model_dir):
        for k, v in load_file(f, device=str(device)).items():
            if k.endswith(_IGNORABLE_SUFFIXES) or (k == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            state[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    validate_state_dict(cfg, state, strict=strict)
    if not strict:
        state = {k: v for k, v in state.items() if k in expected_shapes(cfg)}
    return cfg, state
