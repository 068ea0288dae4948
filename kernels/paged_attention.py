"""Attention straight from the paged KV cache: prefix + tree (or causal chain) masks per sequence.

Verification reads, for each sequence of a batch, its cached prefix and the tree nodes being
checked. Gathering those blocks into a dense [B, Hkv, K, D] copy and calling SDPA with an
explicit [B, 1, T, K] mask (the CPU path, services.core.attention_batch) reads the KV twice and
lets SDPA's masked kernels run at a few percent of memory bandwidth; the Triton kernel
(kernels/triton/paged_attention.py) reads each block once through the block table and builds
the mask from a compact description:

  query t of sequence b sees key slot j  iff  j < prefix[b, t]
                                          or  bit (j - tree_start[b]) of tree_bits[b, t] is set.

A chain of new tokens is causal: prefix[b, t] = past + t + 1, no bits. A tree of up to 64
nodes (the SpecInfer / Medusa tree-attention mask) keeps the committed prefix in prefix[b, t]
and marks the node's ancestors and itself in tree_bits, relative to the slot of node 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention import attention_reference
from kernels.dispatch import use_triton

MAX_TREE_NODES = 64  # tree_bits is one int64 per query


@dataclass
class PagedLayout:
    table: torch.Tensor  # [B, nb] int32: block ids of each sequence's key slots, in order
    prefix: torch.Tensor  # [B, T] int32: leading key slots query t sees
    tree_start: torch.Tensor  # [B] int32: key slot of tree node 0 (unused without bits)
    tree_bits: torch.Tensor  # [B, T] int64: bit i = query t sees slot tree_start + i
    key_len: torch.Tensor  # [B] int32: key slots any query of the sequence may see (loop bound)
    max_key_len: int  # max(key_len), known on the host

    def dense_mask(self) -> torch.Tensor:
        """[B, 1, T, K] bool over the first K = max_key_len slots: the same rule, spelled out."""
        slot = torch.arange(self.max_key_len, device=self.prefix.device)  # [K]
        visible = slot[None, None, :] < self.prefix[:, :, None]  # [B, T, K]
        rel = slot[None, :] - self.tree_start[:, None]  # [B, K]
        in_tree = (rel >= 0) & (rel < MAX_TREE_NODES)
        bits = (self.tree_bits[:, :, None] >> rel.clamp(0, MAX_TREE_NODES - 1)[:, None, :].long()) & 1
        return (visible | (in_tree[:, None, :] & bits.bool()))[:, None]


def gather_blocks(cache: torch.Tensor, layout: PagedLayout) -> torch.Tensor:
    """cache [num_blocks, Hkv, bs, D] -> [B, Hkv, K, D]: each sequence's first K key slots."""
    bs = cache.shape[2]
    nb = -(-layout.max_key_len // bs)
    blocks = cache[layout.table[:, :nb].long()]  # [B, nb, Hkv, bs, D]
    B, _, H, _, D = blocks.shape
    return blocks.transpose(1, 2).reshape(B, H, nb * bs, D)[:, :, : layout.max_key_len]


def paged_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: PagedLayout
) -> torch.Tensor:
    """q [B, H, T, D]; k_cache, v_cache [num_blocks, Hkv, block_size, D] -> [B, H, T, D]."""
    k, v = gather_blocks(k_cache, layout), gather_blocks(v_cache, layout)
    return attention_reference(q, k, v, layout.dense_mask())


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: PagedLayout
) -> torch.Tensor:
    """paged_attention_reference's result, from the Triton kernel where kernels.dispatch says so."""
    if use_triton(q.device):
        from kernels.triton.paged_attention import paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, layout)
    return paged_attention_reference(q, k_cache, v_cache, layout)
