"""A plain forward of an engine's Llama weights over input *embeddings*, with autograd.

Two attribution pieces need what ``Engine.forward`` cannot give: gradient x input needs
gradients with respect to the input embeddings (the engine runs under ``torch.inference_mode``
and writes K/V into its block pool, which no gradient flows through), and the soft faithfulness
metrics feed partly zeroed embeddings (the engine takes token ids). This module recomputes the
same decoder as services.core.model (RMSNorm, RoPE, GQA, SwiGLU) with ``F.linear`` on the fp32
weights and causal SDPA over whole rows, no KV cache; tests/services/core/test_attribution.py
checks its logits against the engine's.

Rows are right-padded: with causal attention a real position never reads the padding after it,
so padding needs no mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.core.model import LlamaModel, apply_rope_signed


def embed(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    """Token ids [...] -> embeddings [..., D] (detached: callers decide what needs a gradient)."""
    return model.embed_tokens.weight.detach()[ids]


def forward_embeddings(model: LlamaModel, embeds: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """embeds [B, T, D] (row b at positions 0..T-1) -> logits [N, V] at the flat positions `rows`
    [N] of [B*T] (only the rows asked for go through the vocabulary projection)."""
    B, T, _ = embeds.shape
    cfg = model.config
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    positions = torch.arange(T).expand(B, T)
    cos, sin = model.rotary(positions, embeds.dtype)  # [B, T, 1, hd]
    x = embeds
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        h = layer.input_layernorm(x)
        qkv = F.linear(h, attn.qkv_proj.weight).view(B, T, H + 2 * Hkv, hd)
        qk = apply_rope_signed(qkv[:, :, : H + Hkv], cos, sin)
        q = qk[:, :, :H].transpose(1, 2)  # [B, H, T, hd]
        k = qk[:, :, H:].transpose(1, 2)  # [B, Hkv, T, hd]
        v = qkv[:, :, H + Hkv :].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, H, T, hd]
        x = x + F.linear(out.transpose(1, 2).reshape(B, T, H * hd), attn.o_proj.weight)
        gate, up = F.linear(layer.post_attention_layernorm(x), mlp.gate_up_proj.weight).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, mlp.down_proj.weight)
    hidden = model.norm(x).reshape(B * T, -1)[rows]  # [N, D]
    return F.linear(hidden, model.lm_head.weight)  # [N, V]
