"""A plain-torch Llama for training and batched labelling (no paged cache).

Parameter names are exactly HF's LlamaForCausalLM names (`model.layers.0.self_attn.q_proj.weight`,
...), so `state_dict()` is a checkpoint transformers and `services.core` load as is. The
serving engine's paged KV cache is built for sessions; training wants dense [B, T] batches
with a causal mask, and labelling wants many sequences decoded at once with a dense,
preallocated cache. Both live here. The RoPE frequencies (with HF's rope_scaling variants)
come from `services.core.model`; the rest is written out here so training does not depend on
the serving model's layout optimisations.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.core.config import LlamaConfig
from services.core.model import RMSNorm, apply_rope, rope_inv_freq


class KVCache:
    """Dense per-layer cache [B, Hkv, T_max, D] with one shared fill length (left-padded batches)."""

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device) -> None:
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t0, t1 = self.length, self.length + k.shape[2]
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.h, self.hkv, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.hkv * self.d, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.hkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.hkv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.hkv, self.d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        gqa = self.hkv != self.h
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TrainLlama(nn.Module):
    """HF-named Llama: `forward` returns final-normed hidden states; `logits` applies the head.

    Keeping the head separate lets callers project onto a subset of the vocabulary
    (a truncated draft vocabulary) or in chunks, instead of materialising [B, T, V].
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] -> hidden [B, T, d]. Without mask: plain causal over the T tokens."""
        x = self.model.embed_tokens(tokens)
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        cos, sin = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += tokens.shape[1]
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        w = self.lm_head.weight if vocab is None else self.lm_head.weight[vocab]
        return hidden @ w.t().to(hidden.dtype)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (tied head left out, as HF saves tied Llamas)."""
        sd = {k: v for k, v in self.state_dict().items() if k != "inv_freq"}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def load_hf(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"checkpoint mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")


@dataclass
class Generated:
    tokens: list[int]  # generated ids (ends with an eos id if one was produced)
    topk_ids: torch.Tensor  # [n, k] int32: the target's top-k at the position before each generated token
    topk_logp: torch.Tensor  # [n, k] float16: their log-probabilities (full-vocab softmax)


@torch.no_grad()
def generate_batch(
    model: TrainLlama,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    temperature: float = 0.0,
    top_k_store: int = 16,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    deadline: float | None = None,
) -> list[Generated]:
    """Decode a batch of prompts together (left-padded, dense cache); temperature 0 = greedy.

    Returns, per prompt, the generated tokens and the model's top-k log-probabilities at
    every generated position: exactly the soft labels distillation needs, for free.
    `deadline` (time.time() value) stops decoding early; answers are then truncated.
    """
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B, P = len(prompts), max(len(p) for p in prompts)
    toks = torch.full((B, P), pad_id, dtype=torch.long)
    valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool)
    for b, p in enumerate(prompts):
        toks[b, P - len(p) :] = torch.tensor(list(p))
        valid[b, P - len(p) :] = True
    valid[:, P:] = True  # generated positions
    toks, valid = toks.to(dev), valid.to(dev)
    pos = (valid[:, :P].long().cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(model.config, B, P + max_new_tokens, dtype, dev)
    causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
    mask = (causal[None] & valid[:, None, :P])[:, None]
    mask = mask | torch.eye(P, dtype=torch.bool, device=dev)  # pad rows attend to themselves: no NaN
    hidden = model(toks, pos, mask, cache)[:, -1:]
    last_pos = pos[:, -1:]
    eos = torch.tensor(list(eos_ids), device=dev)
    # results for every prompt; rows that finished are dropped from the batch (and the cache)
    res_tok = torch.full((B, max_new_tokens), -1, dtype=torch.long)
    res_ids = torch.zeros(B, max_new_tokens, top_k_store, dtype=torch.int32)
    res_lp = torch.zeros(B, max_new_tokens, top_k_store, dtype=torch.float16)
    rows = torch.arange(B)  # original index of each live row
    done = torch.zeros(B, dtype=torch.bool, device=dev)  # live row has produced an eos
    for step in range(max_new_tokens):
        logp = model.logits(hidden[:, 0]).float().log_softmax(-1)
        if temperature > 0:
            probs = (logp / temperature).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]  # generator on `dev`
        else:
            nxt = logp.argmax(-1)
        lp, ids = logp.topk(top_k_store, dim=-1)
        res_tok[rows, step] = nxt.cpu()
        res_ids[rows, step] = ids.int().cpu()
        res_lp[rows, step] = lp.half().cpu()
        done = done | torch.isin(nxt, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if deadline is not None and time.time() >= deadline:
            break
        if int(done.sum()) * 4 >= len(rows):  # compact once a quarter of the live rows finished
            keep = (~done).nonzero()[:, 0]
            rows, nxt, last_pos, valid = rows[keep.cpu()], nxt[keep], last_pos[keep], valid[keep]
            done = done[keep]
            for layer in range(len(cache.k)):
                cache.k[layer] = cache.k[layer][keep]
                cache.v[layer] = cache.v[layer][keep]
        last_pos = last_pos + 1
        m = valid[:, None, None, : cache.length + 1]
        hidden = model(nxt[:, None], last_pos, m, cache)
    eos_set = set(eos_ids)
    results = []
    for b in range(B):
        seq = [t for t in res_tok[b].tolist() if t >= 0]
        n = next((i + 1 for i, t in enumerate(seq) if t in eos_set), len(seq))
        results.append(Generated(seq[:n], res_ids[b, :n], res_lp[b, :n]))
    return results
