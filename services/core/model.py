"""Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) over the paged KV cache.

Parameter names follow HF's LlamaForCausalLM so checkpoints load without renaming;
q/k/v and gate/up are fused at load time (one matmul instead of three / two), which
is what makes CPU decode cheaper than the unfused reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.linear import Plan, linear, prepare_int4, prepare_int8, prepare_packed
from services.core.attention_batch import AttentionBatch
from services.core.config import LlamaConfig
from services.core.quant import GROUP, Q4Groups


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with HF's `rope_scaling` variants (linear, llama3)."""
    dim = config.head_dim
    # Explicit device: models are built under torch.device("meta") before weights are assigned.
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind != "default":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")
    return inv.float()


class Rotary:
    """cos/sin tables indexed by absolute position, grown on demand on the positions' device."""

    def __init__(self, config: LlamaConfig) -> None:
        self.inv_freq = rope_inv_freq(config)  # [head_dim/2], CPU float32
        self.cos = self.sin = torch.empty(0, device="cpu")  # [size, head_dim]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [B, T, 1, head_dim] for x laid out [B, T, heads, head_dim].

        The sin table's first half is negated (see apply_rope_signed).
        """
        need = int(positions.max()) + 1
        if need > self.cos.shape[0] or self.cos.device != positions.device:
            size = max(need, 2 * self.cos.shape[0], 256)
            inv = self.inv_freq.to(positions.device)
            freqs = torch.outer(torch.arange(size, dtype=torch.float32, device=positions.device), inv)
            emb = torch.cat([freqs, freqs], dim=-1)  # [size, head_dim], rotate_half layout
            self.cos, self.sin = emb.cos(), torch.cat([-freqs.sin(), freqs.sin()], dim=-1)
        return self.cos[positions].to(dtype)[:, :, None], self.sin[positions].to(dtype)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's form: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def apply_rope_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """apply_rope with the sign of rotate_half folded into signed_sin = cat(-sin1, sin2):
    one roll instead of neg + cat, bit-identical results."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class SmallBatchLinear(nn.Linear):
    """A bias-free nn.Linear computed by kernels.linear, with optional prepared weight copies:
    packed (oneDNN, exact) or int8 (fbgemm, approximate: drafts only). Which path runs for a
    given row count is kernels.linear's choice."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.packed: torch.Tensor | None = None  # not a parameter: derived, and not saved
        self.int8: torch.Tensor | None = None  # ditto; takes precedence over `packed`
        self.plan: Plan | None = None  # matmul path per row bucket (kernels.linear_choice)
        # The model's published 4-bit weights (kernels.linear.prepare_int4 + group size), which
        # then serve every product instead of `weight` (kept: the fp32 dequantization).
        self.int4: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def pack(self) -> int:
        """Make (or refresh) the packed copy; returns its size in bytes (0 if unavailable, or
        when the int8 copy serves this layer)."""
        self.packed = None if self.int8 is not None or self.int4 is not None else prepare_packed(self.weight)
        return 0 if self.packed is None else self.packed.numel() * self.packed.element_size()

    def quantize_int8(self) -> int:
        """Make (or refresh) the int8 copy; returns its size in bytes (0 if unavailable)."""
        self.int8 = prepare_int8(self.weight)
        return 0 if self.int8 is None else self.weight.numel() + 8 * self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.packed, self.int8, self.plan, self.int4)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = SmallBatchLinear(config.hidden_size, q_dim + 2 * kv_dim)
        self.o_proj = SmallBatchLinear(q_dim, config.hidden_size)
        self.split = (q_dim, kv_dim, kv_dim)  # row blocks of qkv_proj.weight

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch, layer: int
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
        qk = apply_rope_signed(qkv[:, :, : self.n_heads + self.n_kv], cos, sin)  # q and k together
        q = qk[:, :, : self.n_heads].transpose(1, 2)  # [B, H, T, D]
        k = qk[:, :, self.n_heads :].transpose(1, 2)  # [B, Hkv, T, D]
        v = qkv[:, :, self.n_heads + self.n_kv :].transpose(1, 2)
        out = batch.attend(layer, q, k, v)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = SmallBatchLinear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = SmallBatchLinear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, batch: AttentionBatch, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = SmallBatchLinear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(config)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        logit_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, positions: [B, T] -> (logits, hidden).

        hidden is the final-normed state [B, T, hidden]. logits is [B, T, vocab], or
        [N, vocab] for the flattened rows `logit_rows` of [B*T] when given (prefill only
        needs the last row; the vocab projection is the largest matmul of a small model).
        The caller commits the batch after a successful forward.
        """
        x = self.embed_tokens(tokens)
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, batch, i)
        hidden = self.norm(x)
        if logit_rows is not None:
            return self.lm_head(hidden.reshape(-1, hidden.shape[-1])[logit_rows]), hidden
        return self.lm_head(hidden), hidden

    def use_q4_weights(self, groups: dict[str, Q4Groups]) -> int:
        """Serve every projection that has published 4-bit groups (HF names, see
        services.core.quant) from them. Each one must dequantize to exactly the fp32 weight
        loaded, so the codes are known to be these weights. Returns the projections switched."""
        switched = 0
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            fused = {
                layer.self_attn.qkv_proj: [p + f"self_attn.{n}_proj.weight" for n in "qkv"],
                layer.self_attn.o_proj: [p + "self_attn.o_proj.weight"],
                layer.mlp.gate_up_proj: [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                layer.mlp.down_proj: [p + "mlp.down_proj.weight"],
            }
            for module, names in fused.items():
                if not all(n in groups for n in names):
                    continue
                g = Q4Groups.cat([groups[n] for n in names])
                if not torch.equal(g.dequantize(), module.weight.detach()):
                    raise ValueError(
                        f"the 4-bit weights of {names[0]} do not dequantize to the loaded weights"
                    )
                prepared = prepare_int4(g.codes, g.scale, g.offset, GROUP)
                if prepared is None:
                    return 0
                module.int4 = (*prepared, GROUP)
                switched += 1
        return switched

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load HF LlamaForCausalLM names, fusing q/k/v and gate/up."""
        fused: dict[str, torch.Tensor] = {}
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            fused[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
                [state[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]
            )
            fused[f"layers.{i}.self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"]
            fused[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
                [state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]
            )
            fused[f"layers.{i}.mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                fused[f"layers.{i}.{norm}.weight"] = state[p + f"{norm}.weight"]
        fused["embed_tokens.weight"] = state["model.embed_tokens.weight"]
        fused["norm.weight"] = state["model.norm.weight"]
        if not self.config.tie_word_embeddings:
            fused["lm_head.weight"] = state["lm_head.weight"]
        # assign=True adopts the checkpoint tensors (no copy; works on a meta-device model).
        fused = {k: v.contiguous() for k, v in fused.items()}  # row-major, see linear()
        missing, unexpected = self.load_state_dict(fused, strict=False, assign=True)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
            missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"checkpoint mismatch: missing={missing} unexpected={unexpected}")
