"""The layout of one batched forward over the paged KV cache (services.core.kv).

Each sequence b gets n_new[b] new tokens, right-padded to T. A *chain* sequence appends them
after its committed tokens; a *tree* sequence adds them as tree nodes to its scratch blocks.
Keys are gathered per sequence as its committed blocks followed, for a tree, by its scratch
blocks, so key slot j of a chain sequence is cache position j, and a tree's node i sits at
slot len(blocks) * block_size + i. The boolean mask says which slots each query may read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention import attention
from kernels.dispatch import use_triton
from kernels.paged_attention import MAX_TREE_NODES, PagedLayout, paged_attention
from services.core.kv import SequenceKV


@dataclass
class AttentionBatch:
    seqs: list[SequenceKV]
    past: list[int]  # committed tokens of each sequence before this forward
    tokens: list[list[int]]  # the new token ids of each sequence
    trees: list[bool]  # per sequence: the new tokens are tree nodes (scratch), not a chain
    write_rows: torch.Tensor  # [N] indices into the flattened [B*T] new tokens that are real
    write_blk: torch.Tensor  # [N] block ids the new KV goes to
    write_off: torch.Tensor  # [N] in-block offsets
    gather_idx: torch.Tensor  # [B, nb] block ids to gather keys from (padded with the first)
    key_len: int  # K: key slots every sequence's mask covers
    mask: torch.Tensor | None  # [B, 1, T, K] bool, True = attend; None = attend to all K keys
    # The same keys and mask for a kernel that reads the blocks in place (kernels.paged_attention);
    # None where the dense path runs: the CPU, or a tree of more than 64 nodes.
    paged: PagedLayout | None = None
    # The dtype the dense path computes attention in (None: the model's); see kernels.attention.
    compute_dtype: torch.dtype | None = None

    @classmethod
    def build(
        cls,
        seqs: list[SequenceKV],
        tokens: list[list[int]],
        tree_masks: list[torch.Tensor | None] | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> AttentionBatch:
        """Reserve cache room and lay out a forward of tokens[b] after each sequence.

        tree_masks[b], when given, makes tokens[b] new nodes of the tree in seqs[b]'s scratch
        (earlier nodes already there): mask [n_new, scratch_len + n_new] says which nodes each
        new one may attend to (its ancestors and itself); all committed tokens are visible.
        Without a tree mask new tokens attend causally.
        """
        pool = seqs[0].pool
        bs, dev = pool.block_size, pool.device
        n_new = [len(t) for t in tokens]
        T = max(n_new)
        trees = tree_masks or [None] * len(seqs)
        rows: list[int] = []
        blks: list[int] = []
        offs: list[int] = []
        tables: list[list[int] | None] = []  # None: the sequence's cached table serves
        key_lens: list[int] = []
        for b, (s, n, tree) in enumerate(zip(seqs, n_new, trees, strict=True)):
            rows += range(b * T, b * T + n)
            if tree is None:
                s.reserve(s.length + n)
                blocks, first = s.blocks, s.length
                tables.append(None)
                key_lens.append(s.length + n)
            else:
                s.reserve_scratch(s.scratch_len + n)
                blocks, first = s.scratch, s.scratch_len
                tables.append(s.blocks + s.scratch)
                key_lens.append(len(s.blocks) * bs + s.scratch_len + n)
            blks += (blocks[p // bs] for p in range(first, first + n))
            offs += (p % bs for p in range(first, first + n))
        K = max(key_lens)
        nb = -(-K // bs)
        if len(seqs) == 1:
            table = seqs[0].table()[:nb] if tables[0] is None else torch.tensor(tables[0], device=dev)
            gather = table[None]
        else:
            padded = []
            for s, table in zip(seqs, tables, strict=True):
                ids = (s.blocks if table is None else table)[:nb]
                padded.append(ids + [ids[0]] * (nb - len(ids)))
            gather = torch.tensor(padded, dtype=torch.long, device=dev)
        paged = None
        if use_triton(dev) and all(t is None or t.shape[1] <= MAX_TREE_NODES for t in trees):
            paged = cls._paged(seqs, n_new, trees, T, gather, key_lens)
        mask = None
        if paged is None and (T > 1 or len(set(key_lens)) > 1 or any(t is not None for t in trees)):
            mask = cls._mask(seqs, n_new, trees, T, K)
        return cls(
            seqs,
            [s.length for s in seqs],
            tokens,
            [t is not None for t in trees],
            torch.tensor(rows, dtype=torch.long, device=dev),
            torch.tensor(blks, dtype=torch.long, device=dev),
            torch.tensor(offs, dtype=torch.long, device=dev),
            gather,
            K,
            mask,
            paged,
            compute_dtype,
        )

    @staticmethod
    def _paged(
        seqs: list[SequenceKV],
        n_new: list[int],
        trees: list[torch.Tensor | None],
        T: int,
        gather: torch.Tensor,
        key_lens: list[int],
    ) -> PagedLayout:
        """The rule of _mask in PagedLayout's terms: a prefix length per query plus tree bits."""
        bs = seqs[0].pool.block_size
        prefix = torch.zeros(len(seqs), T, dtype=torch.int32)
        bits = torch.zeros(len(seqs), T, dtype=torch.int64)
        start = torch.zeros(len(seqs), dtype=torch.int32)
        for b, (s, n, tree) in enumerate(zip(seqs, n_new, trees, strict=True)):
            p = s.length
            prefix[b] = max(p, 1)  # padded queries: any finite slot (output unused)
            if tree is None:
                prefix[b, :n] = torch.arange(p + 1, p + n + 1)  # causal over past + new
            else:
                start[b] = len(s.blocks) * bs
                prefix[b, :n] = p
                # Bit i for tree node i; node 63's bit wraps to the sign, as int64 arithmetic does.
                shifts = torch.arange(tree.shape[1], dtype=torch.int64)
                bits[b, :n] = (tree.to(torch.int64) << shifts).sum(-1)
        dev = gather.device
        return PagedLayout(
            table=gather.to(torch.int32),
            prefix=prefix.to(dev),
            tree_start=start.to(dev),
            tree_bits=bits.to(dev),
            key_len=torch.tensor(key_lens, dtype=torch.int32, device=dev),
            max_key_len=max(key_lens),
        )

    @staticmethod
    def _mask(
        seqs: list[SequenceKV], n_new: list[int], trees: list[torch.Tensor | None], T: int, K: int
    ) -> torch.Tensor:
        dev, bs = seqs[0].pool.device, seqs[0].pool.block_size
        key = torch.arange(K, device=dev)
        mask = torch.zeros(len(seqs), 1, T, K, dtype=torch.bool, device=dev)
        for b, (s, n, tree) in enumerate(zip(seqs, n_new, trees, strict=True)):
            p = s.length
            if tree is None:
                allowed = key[None, :] <= (p + torch.arange(T, device=dev))[:, None]  # causal over past + new
            else:
                at = len(s.blocks) * bs  # slot of scratch node 0
                allowed = (key[None, :] < p).expand(T, K).clone()
                allowed[:n, at : at + tree.shape[1]] = tree.to(dev)
            allowed[n:] = key[None, :] < max(p, 1)  # padded queries: any finite slot (output unused)
            mask[b, 0] = allowed
        return mask

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """Store this layer's new K/V ([B, kv_heads, T, D]) and attend q [B, H, T, D] over every
        key a query may see: in place through the block table where a paged kernel runs,
        else over a gathered copy. Returns [B, H, T, D]."""
        self.write(layer, k_new, v_new)
        pool = self.seqs[0].pool
        if self.paged is not None:
            return paged_attention(q, pool.k[layer], pool.v[layer], self.paged)
        keys, values = self.gather(layer)
        return attention(q, keys, values, self.mask, self.compute_dtype)

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Store this layer's new K/V [B, kv_heads, T, D] in their cache slots."""
        pool = self.seqs[0].pool
        B, H, T, D = k_new.shape
        k_rows = k_new.transpose(1, 2).reshape(B * T, H, D)
        v_rows = v_new.transpose(1, 2).reshape(B * T, H, D)
        if len(self.write_rows) != B * T:  # padded batch: only the real rows
            k_rows, v_rows = k_rows[self.write_rows], v_rows[self.write_rows]
        pool.k[layer][self.write_blk, :, self.write_off, :] = k_rows
        pool.v[layer][self.write_blk, :, self.write_off, :] = v_rows

    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's first K key slots of this layer: keys, values [B, kv_heads, K, D], in
        compute_dtype when one is set."""
        pool = self.seqs[0].pool
        B = self.gather_idx.shape[0]
        H, D = pool.k.shape[2], pool.k.shape[4]
        if self.compute_dtype not in (None, pool.k.dtype):
            return self._gather_converted(layer, self.compute_dtype)
        if B == 1:
            # index_select on the contiguous block dim, then one transposing copy (cheaper than
            # advanced indexing; selecting from a transposed view would copy the whole layer).
            idx = self.gather_idx[0]
            k = pool.k[layer].index_select(0, idx).transpose(0, 1).reshape(1, H, -1, D)[:, :, : self.key_len]
            v = pool.v[layer].index_select(0, idx).transpose(0, 1).reshape(1, H, -1, D)[:, :, : self.key_len]
            return k, v
        # [B, nb, H, bs, D] -> [B, H, nb*bs, D] -> first K slots
        k = pool.k[layer][self.gather_idx].transpose(1, 2).reshape(B, H, -1, D)[:, :, : self.key_len]
        v = pool.v[layer][self.gather_idx].transpose(1, 2).reshape(B, H, -1, D)[:, :, : self.key_len]
        return k, v

    def _gather_converted(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gather() in another dtype, converted by the copy that lays the keys out rather than
        by one more copy after it (float64 attention, the q4_1 weights: a decode step at a
        300-token context cost 20.9 ms this way against 22.4 converting after, fp32 19.6)."""
        pool = self.seqs[0].pool
        B, nb = self.gather_idx.shape
        H, bs, D = pool.k.shape[2], pool.k.shape[3], pool.k.shape[4]
        idx = self.gather_idx.reshape(-1)
        out = []
        for cache in (pool.k[layer], pool.v[layer]):
            # [B * nb, H, bs, D] -> [B, H, nb, bs, D] -> [B, H, nb * bs, D] -> first K slots
            blocks = cache.index_select(0, idx).view(B, nb, H, bs, D).transpose(1, 2)
            laid_out = torch.empty(B, H, nb, bs, D, dtype=dtype, device=cache.device).copy_(blocks)
            out.append(laid_out.view(B, H, nb * bs, D)[:, :, : self.key_len])
        return out[0], out[1]

    def commit(self) -> None:
        """After a successful forward: chains commit their tokens, trees keep their new nodes."""
        for s, ids, tree in zip(self.seqs, self.tokens, self.trees, strict=True):
            if tree:
                s.scratch_tokens += ids
            else:
                s.commit(ids)
