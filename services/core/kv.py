"""Paged KV cache: fixed-size blocks in one pool per model, a block table per sequence.

Blocks are the unit later shipped to Redis (content-addressed by token ids), so a
sequence's cache is always addressable block by block. Pool layout per layer:
k, v: [num_blocks, kv_heads, block_size, head_dim]; the pool grows by doubling up to
`max_blocks` and refuses beyond that (RESOURCE_EXHAUSTED), never silently evicting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.core.config import LlamaConfig
from services.core.errors import ResourceExhausted


class BlockPool:
    def __init__(
        self,
        config: LlamaConfig,
        *,
        block_size: int = 16,
        initial_blocks: int = 64,
        max_blocks: int = 4096,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.num_layers = config.num_hidden_layers
        self._shape = (config.num_key_value_heads, block_size, config.head_dim)
        # k, v: [layers, num_blocks, kv_heads, block_size, head_dim]
        self.k = torch.zeros(self.num_layers, initial_blocks, *self._shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._free: list[int] = list(range(initial_blocks - 1, -1, -1))

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def free_blocks(self) -> int:
        return len(self._free) + (self.max_blocks - self.num_blocks)

    def _grow(self, needed: int) -> None:
        new_total = min(self.max_blocks, max(self.num_blocks * 2, self.num_blocks + needed))
        extra = new_total - self.num_blocks
        pad = torch.zeros(self.num_layers, extra, *self._shape, dtype=self.k.dtype, device=self.k.device)
        self.k = torch.cat([self.k, pad], dim=1)
        self.v = torch.cat([self.v, torch.zeros_like(pad)], dim=1)
        self._free = list(range(new_total - 1, new_total - extra - 1, -1)) + self._free

    def allocate(self, n: int) -> list[int]:
        if n > self.free_blocks:
            raise ResourceExhausted(
                f"KV cache full: need {n} more blocks of {self.block_size} tokens, "
                f"{self.free_blocks} free (max_blocks={self.max_blocks}); release sessions or raise the limit"
            )
        if n > len(self._free):
            self._grow(n - len(self._free))
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class SequenceKV:
    """One sequence's view of the pool: its block table and committed length."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.length = 0
        self._table: torch.Tensor | None = None

    def reserve(self, total_len: int) -> None:
        need = -(-total_len // self.pool.block_size) - len(self.blocks)
        if need > 0:
            self.blocks += self.pool.allocate(need)
            self._table = None

    def table(self) -> torch.Tensor:
        if self._table is None:
            self._table = torch.tensor(self.blocks, dtype=torch.long, device=self.pool.k.device)
        return self._table

    def truncate(self, length: int) -> None:
        """Drop tokens past `length` and return whole unused blocks to the pool."""
        if length > self.length:
            raise ValueError(f"cannot truncate a sequence of {self.length} tokens to {length}")
        self.length = length
        keep = -(-length // self.pool.block_size)
        if keep < len(self.blocks):
            self.pool.free(self.blocks[keep:])
            self.blocks = self.blocks[:keep]
            self._table = None

    def release(self) -> None:
        self.pool.free(self.blocks)
        self.blocks, self.length, self._table = [], 0, None

    def slots(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ids and in-block offsets for cache positions (any shape, long)."""
        bs = self.pool.block_size
        return self.table()[positions // bs], positions % bs

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy the KV of cache positions src[i] to dst[i] in every layer (tree compaction)."""
        if not src:
            return
        s_blk, s_off = self.slots(torch.tensor(src))
        d_blk, d_off = self.slots(torch.tensor(dst))
        for pool in (self.pool.k, self.pool.v):
            pool[:, d_blk, :, d_off, :] = pool[:, s_blk, :, s_off, :].clone()


@dataclass
class AttentionBatch:
    """Everything one forward needs to write new KV and attend over the cache.

    B sequences each get n_new[b] new tokens, right-padded to T. Keys are the
    gathered cache [B, kv_heads, K, head_dim] with K = max total length.
    """

    seqs: list[SequenceKV]
    past: list[int]
    n_new: list[int]
    write_rows: torch.Tensor  # [N] indices into the flattened [B*T] new tokens that are real
    write_blk: torch.Tensor  # [N]
    write_off: torch.Tensor  # [N]
    gather_idx: torch.Tensor  # [B, max_blocks] block ids (padded with the first block)
    key_len: int  # K
    mask: torch.Tensor | None  # [B, 1, T, K] bool, True = attend; None = attend to all K keys

    @classmethod
    def build(
        cls,
        seqs: list[SequenceKV],
        n_new: list[int],
        tree_masks: list[tuple[int, torch.Tensor] | None] | None = None,
    ) -> AttentionBatch:
        """Reserve cache room and lay out a forward over n_new[b] tokens after each sequence.

        tree_masks[b] = (start, mask): the cache from position `start` on holds tree nodes
        (earlier ones already cached, then the n_new[b] new ones); mask [n_new[b], past + n_new[b]
        - start] says which of them each new token may attend to (its ancestors and itself).
        Keys before `start` are always visible. Without a tree mask new tokens attend causally.
        """
        T = max(n_new)
        past = [s.length for s in seqs]
        rows, blks, offs = [], [], []
        for b, (s, n) in enumerate(zip(seqs, n_new, strict=True)):
            s.reserve(s.length + n)
            blk, off = s.slots(torch.arange(s.length, s.length + n))
            rows.append(torch.arange(b * T, b * T + n))
            blks.append(blk)
            offs.append(off)
        total = [p + n for p, n in zip(past, n_new, strict=True)]
        K = max(total)
        nb = -(-K // seqs[0].pool.block_size)
        gather = torch.stack(
            [
                torch.nn.functional.pad(s.table()[:nb], (0, nb - min(nb, len(s.blocks))), value=s.blocks[0])
                for s in seqs
            ]
        )
        mask = None
        trees = tree_masks or [None] * len(seqs)
        if T > 1 or len(set(total)) > 1 or any(t is not None for t in trees):
            key = torch.arange(K)
            mask = torch.zeros(len(seqs), 1, T, K, dtype=torch.bool)
            for b, (p, n) in enumerate(zip(past, n_new, strict=True)):
                tree = trees[b]
                if tree is None:
                    allowed = key[None, :] <= (p + torch.arange(T))[:, None]  # causal over past + new
                else:
                    start, tree_mask = tree
                    allowed = (key[None, :] < start).expand(T, K).clone()
                    allowed[:n, start : p + n] = tree_mask
                allowed[n:] = key[None, :] < max(p, 1)  # padded queries: any valid key (output unused)
                mask[b, 0] = allowed
        return cls(seqs, past, n_new, torch.cat(rows), torch.cat(blks), torch.cat(offs), gather, K, mask)

    def write_and_gather(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new K/V ([B, kv_heads, T, D]) and return all keys/values [B, kv_heads, K, D]."""
        pool = self.seqs[0].pool
        B, H, T, D = k_new.shape
        k_rows = k_new.transpose(1, 2).reshape(B * T, H, D)
        v_rows = v_new.transpose(1, 2).reshape(B * T, H, D)
        if len(self.write_rows) != B * T:  # padded batch: only the real rows
            k_rows, v_rows = k_rows[self.write_rows], v_rows[self.write_rows]
        pool.k[layer][self.write_blk, :, self.write_off, :] = k_rows
        pool.v[layer][self.write_blk, :, self.write_off, :] = v_rows
        if B == 1:
            # index_select on the contiguous block dim, then one transposing copy (cheaper than
            # advanced indexing; selecting from a transposed view would copy the whole layer).
            idx = self.gather_idx[0]
            k = pool.k[layer].index_select(0, idx).transpose(0, 1).reshape(1, H, -1, D)[:, :, : self.key_len]
            v = pool.v[layer].index_select(0, idx).transpose(0, 1).reshape(1, H, -1, D)[:, :, : self.key_len]
            return k, v
        # [B, nb, H, bs, D] -> [B, H, nb*bs, D] -> first K positions
        k = pool.k[layer][self.gather_idx].transpose(1, 2).reshape(B, H, -1, D)[:, :, : self.key_len]
        v = pool.v[layer][self.gather_idx].transpose(1, 2).reshape(B, H, -1, D)[:, :, : self.key_len]
        return k, v

    def commit(self) -> None:
        """Advance each sequence past its new tokens (after a successful forward)."""
        for s, n in zip(self.seqs, self.n_new, strict=True):
            s.length += n
