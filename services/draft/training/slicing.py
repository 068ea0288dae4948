"""Model surgery: a draft made of some of the target's layers, with its embedding, norm and head."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.core.config import LlamaConfig


def slice_state(state: dict[str, torch.Tensor], layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """HF state of a draft made of the target's `layers` (renumbered 0..n-1) + embedding/norm/head."""
    out = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    for new, old in enumerate(layers):
        p = f"model.layers.{old}."
        for k, v in state.items():
            if k.startswith(p):
                out[f"model.layers.{new}." + k[len(p) :]] = v
    return out


def slice_config(cfg: LlamaConfig, n_layers: int) -> LlamaConfig:
    d = cfg.to_hf_dict()
    d["num_hidden_layers"] = n_layers
    d.pop("specmesh", None)
    return LlamaConfig.from_hf_dict(d)
