"""Paged KV cache: one preallocated block pool per model, a block table per sequence.

Pool layout per layer: k, v [num_blocks, kv_heads, block_size, head_dim], allocated once at
`max_blocks` (never grown, never silently evicting live blocks: RESOURCE_EXHAUSTED when full).

Blocks have two lives. A sequence's *tail* block (partially filled) and its tree *scratch*
blocks are private and written freely. Once every token of a block is committed the block is
*sealed*: it gets a content address (services.core.block_keys, the chained hash of vLLM's
prefix caching and LMCache) and becomes immutable and reference-counted, so sequences with a
common prefix share it. A sealed block nobody references stays cached (LRU) until its space is
needed, or until more than `max_cached_blocks` are cached: the oldest then goes back to the free
list. The cap bounds resident memory: the pool is mapped, not touched, up front (CPU), so without
it every distinct prefix ever served would stay resident until the whole pool had been touched
(a SmolLM2 block is 0.74 MB; 65,536 tokens are 3 GB). A block capped out is reused before an
untouched one, and a Redis store behind the pool (services.runtime.kv_store) still has it.
The cap is shared with live sequences, as a fixed pool shares it in vLLM: once `max_cached_blocks`
blocks are resident, a sequence that needs a block takes the oldest cached one before touching
new memory, so the pool stays at max(cap, what live sequences hold at once) instead of growing
to the cap plus the live peak.
Nothing ever writes into a sealed block: new tokens go to the tail, tree nodes to
scratch, and a rollback into a sealed block unseals it (sole owner) or copies it (shared).

Beyond this process (services.runtime.kv_store): `on_seal` hears of every block sealed here with
KV computed here, so it can be published; `insert_cached` takes in a sealed block computed
elsewhere, which `adopt_cached` then shares like any other.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from services.core.block_keys import block_key
from services.core.config import LlamaConfig
from services.core.errors import ResourceExhausted


class BlockPool:
    def __init__(
        self,
        config: LlamaConfig,
        *,
        block_size: int = 16,
        max_blocks: int = 4096,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        digest: str = "",
        max_cached_blocks: int | None = None,
    ) -> None:
        if max_cached_blocks is not None and max_cached_blocks < 0:
            raise ValueError(f"max_cached_blocks must be >= 0, got {max_cached_blocks}")
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.max_cached_blocks = max_blocks if max_cached_blocks is None else max_cached_blocks
        self.device = torch.device(device)
        self.digest = digest  # of what computed the KV (the weights, and int8 if quantized)
        self.dtype_name = str(dtype).removeprefix("torch.")
        shape = (config.num_key_value_heads, block_size, config.head_dim)
        # k, v: [layers, max_blocks, kv_heads, block_size, head_dim]. torch.empty maps the memory
        # without touching it (CPU), so resident memory grows only with the blocks ever used;
        # each block is zeroed when first handed out (see allocate).
        self.k = torch.empty(config.num_hidden_layers, max_blocks, *shape, dtype=dtype, device=self.device)
        self.v = torch.empty_like(self.k)
        self._free: list[int] = list(range(max_blocks - 1, -1, -1))  # unsealed, unreferenced; pop() = next
        self._cached: OrderedDict[int, None] = OrderedDict()  # sealed, unreferenced; oldest first
        self._refs = [0] * max_blocks
        self._key: list[bytes | None] = [None] * max_blocks
        self._index: dict[bytes, int] = {}  # key -> the sealed block holding that content
        self._touched = bytearray(max_blocks)  # 1 = zeroed once, holds finite values since
        self.resident_blocks = 0  # blocks ever touched: the pool's resident memory
        # called with (block, key) when KV computed here is sealed (not when an equal block
        # already existed): the publisher's seam. Runs on the engine thread, so it must be quick.
        self.on_seal: Callable[[int, bytes], None] | None = None

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """One block's K (or V): [layers, kv_heads, block_size, head_dim]."""
        layers, _, heads, bs, dim = self.k.shape
        return layers, heads, bs, dim

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take: never sealed, or sealed but referenced by nobody."""
        return len(self._free) + len(self._cached)

    @property
    def cached_blocks(self) -> int:
        return len(self._cached)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def key_of(self, block: int) -> bytes | None:
        return self._key[block]

    def block_key(self, parent: bytes | None, token_ids: list[int]) -> bytes:
        return block_key(self.digest, self.dtype_name, parent, token_ids)

    def allocate(self, n: int, *, grow: bool = False) -> list[int]:
        """n private blocks (refcount 1): free resident memory first, then the least recently
        cached block once max_cached_blocks are resident (grow=True: touch new memory first),
        then untouched memory."""
        if n > self.free_blocks:
            raise ResourceExhausted(
                f"KV cache full: need {n} more blocks of {self.block_size} tokens, "
                f"{self.free_blocks} free (max_blocks={self.max_blocks}); release sessions or raise the limit"
            )
        out = []
        for _ in range(n):
            fresh = self._free and not self._touched[self._free[-1]]  # no resident block is free
            at_cap = self.resident_blocks >= self.max_cached_blocks and not grow
            if self._free and not (fresh and at_cap and self._cached):
                b = self._free.pop()
            else:
                b, _ = self._cached.popitem(last=False)
                del self._index[self._key[b]]
                self._key[b] = None
            self._refs[b] = 1
            if not self._touched[b]:
                # Masked attention still multiplies by every gathered slot; uninitialised memory
                # could hold NaN, which a -inf mask does not cancel.
                self.k[:, b].zero_()
                self.v[:, b].zero_()
                self._touched[b] = 1
                self.resident_blocks += 1
            out.append(b)
        return out

    def share(self, block: int) -> None:
        """Take one more reference to a sealed block (revived from the cache if unreferenced)."""
        if self._refs[block] == 0:
            del self._cached[block]
        self._refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unreferenced sealed blocks stay cached."""
        for b in reversed(blocks):  # so that the first block is the next one handed out
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            if self._key[b] is None:
                self._free.append(b)
            else:
                self._cached[b] = None
        self._trim_cache()

    def _trim_cache(self) -> None:
        """Return the oldest cached blocks beyond max_cached_blocks to the free list, on top, so
        that their (already resident) memory is reused before untouched memory."""
        while len(self._cached) > self.max_cached_blocks:
            b, _ = self._cached.popitem(last=False)
            del self._index[self._key[b]]
            self._key[b] = None
            self._free.append(b)

    def lookup(self, key: bytes) -> int | None:
        return self._index.get(key)

    def seal(self, block: int, key: bytes) -> int:
        """Make a private, full block immutable under `key`; returns the block that now holds
        the content: `block`, or an existing block with the same key (then `block` is released
        and the caller switches to the returned one)."""
        existing = self._index.get(key)
        if existing is not None and existing != block:
            self.share(existing)
            self.release([block])
            return existing
        self._index[key] = block
        self._key[block] = key
        if self.on_seal is not None:
            self.on_seal(block, key)
        return block

    def insert_cached(self, key: bytes, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Hold a sealed block computed elsewhere (k, v [layers, kv_heads, block_size,
        head_dim]) under `key`, cached and unreferenced, for adopt_cached to share. False when
        no block is free (every one is referenced)."""
        if key in self._index:
            return True
        if not self.free_blocks:
            return False
        # grow: taking the oldest cached block could drop one restored just before in this run
        (b,) = self.allocate(1, grow=True)
        self.k[:, b] = k
        self.v[:, b] = v
        self._index[key] = b
        self._key[b] = key
        # unreferenced and sealed: the newest entry of the cache. Not trimmed here: the caller
        # adopts a run of restored blocks right after inserting them, and the cap must not drop
        # the first of them before that (the next release trims)
        self._refs[b] = 0
        self._cached[b] = None
        return True

    def unseal(self, block: int) -> None:
        """Make a sealed block its sole owner's private block again (a rollback into it)."""
        del self._index[self._key[block]]
        self._key[block] = None

    def copy_block(self, src: int, dst: int) -> None:
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def rename(self, digest: str) -> None:
        """Change what computed the KV (e.g. after quantizing the weights). Only while no block
        is in use; cached blocks of the old computation are dropped."""
        if any(self._refs):
            raise RuntimeError("cannot rename a KV pool while sequences hold blocks")
        for b in self._cached:
            self._key[b] = None
            self._free.append(b)
        self._cached.clear()
        self._index.clear()
        self.digest = digest


class SequenceKV:
    """One sequence's view of the pool: its committed tokens, block table and tree scratch.

    Positions [0, length) hold committed KV in `blocks`: sealed full blocks (shareable), then at
    most one private tail block. Tree nodes being verified or drafted live in private `scratch`
    blocks (node i at scratch slot i) until accept_scratch copies a path into the tail or
    drop_scratch discards them.
    """

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.tokens: list[int] = []  # committed token ids, one per cached position
        self.keys: list[bytes] = []  # keys of the sealed blocks, blocks[: len(keys)]
        self.scratch: list[int] = []
        self.scratch_tokens: list[int] = []  # one per scratch slot
        self._table: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def scratch_len(self) -> int:
        return len(self.scratch_tokens)

    def table(self) -> torch.Tensor:
        """Block ids [len(blocks)] on the pool's device (cached until the table changes)."""
        if self._table is None:
            self._table = torch.tensor(self.blocks, dtype=torch.long, device=self.pool.device)
        return self._table

    def reserve(self, total_len: int) -> None:
        """Make room for committed KV up to total_len (writes go to positions >= length)."""
        need = -(-total_len // self.pool.block_size) - len(self.blocks)
        if need > 0:
            self.blocks += self.pool.allocate(need)
            self._table = None

    def reserve_scratch(self, total_nodes: int) -> None:
        need = -(-total_nodes // self.pool.block_size) - len(self.scratch)
        if need > 0:
            self.scratch += self.pool.allocate(need)

    def commit(self, token_ids: list[int]) -> None:
        """Count the KV just written at positions [length, length + n) as committed, and seal
        the blocks that became full (switching to an equal block already in the pool)."""
        self.tokens += token_ids
        bs = self.pool.block_size
        for i in range(len(self.keys), self.length // bs):
            parent = self.keys[-1] if self.keys else None
            key = self.pool.block_key(parent, self.tokens[i * bs : (i + 1) * bs])
            # An equal block may hold KV that differs from ours in the last bits (another batch
            # shape computed it); both are this prefix's KV, and sharing it is what saves memory.
            block = self.pool.seal(self.blocks[i], key)
            if block != self.blocks[i]:
                self.blocks[i] = block
                self._table = None
            self.keys.append(key)

    def continuation_keys(self, token_ids: list[int], keep: int = 1) -> list[bytes]:
        """Keys of the full blocks that token_ids would add after this sequence, leaving at least
        `keep` tokens out; [] unless the sequence ends at a block boundary with nothing reserved
        (the next block must start at position length)."""
        bs = self.pool.block_size
        if self.length % bs or len(self.blocks) != len(self.keys) or self.scratch:
            return []
        keys: list[bytes] = []
        parent = self.keys[-1] if self.keys else None
        for start in range(0, len(token_ids) - keep - bs + 1, bs):
            parent = self.pool.block_key(parent, token_ids[start : start + bs])
            keys.append(parent)
        return keys

    def adopt_cached(self, token_ids: list[int], keep: int = 1) -> int:
        """Append the longest run of cached full blocks continuing this sequence with token_ids,
        leaving at least `keep` tokens to compute; returns how many tokens were adopted (0 where
        continuation_keys gives none)."""
        bs = self.pool.block_size
        adopted = 0
        for key in self.continuation_keys(token_ids, keep):
            block = self.pool.lookup(key)
            if block is None:
                break
            self.pool.share(block)
            self.blocks.append(block)
            self.keys.append(key)
            self.tokens += token_ids[adopted : adopted + bs]
            adopted += bs
        if adopted:
            self._table = None
        return adopted

    def truncate(self, length: int) -> None:
        """Keep the first `length` committed tokens, drop the tree scratch, and return the
        blocks past them. Never writes a sealed block: cutting into one unseals it when this
        sequence is its only user and copies it to a private block when it is shared."""
        if length > self.length:
            raise ValueError(f"cannot truncate a sequence of {self.length} tokens to {length}")
        self.drop_scratch()
        bs = self.pool.block_size
        keep = -(-length // bs)
        tail = keep - 1 if length % bs and keep - 1 < len(self.keys) else None
        if tail is not None and self.pool.refcount(self.blocks[tail]) > 1:
            (private,) = self.pool.allocate(1)  # first: a full pool fails before anything changes
            self.pool.copy_block(self.blocks[tail], private)
            self.pool.release([self.blocks[tail]])
            self.blocks[tail] = private
            self._table = None
        elif tail is not None:
            self.pool.unseal(self.blocks[tail])
        if keep < len(self.blocks):
            self.pool.release(self.blocks[keep:])
            self.blocks = self.blocks[:keep]
            self._table = None
        del self.tokens[length:]
        del self.keys[length // bs :]

    def drop_scratch(self) -> None:
        if self.scratch:
            self.pool.release(self.scratch)
        self.scratch, self.scratch_tokens = [], []

    def accept_scratch(self, nodes: list[int]) -> None:
        """Commit the scratch nodes `nodes` (a root-to-node path) after the committed tokens:
        copy their KV into the tail, then drop the scratch."""
        if nodes:
            bs = self.pool.block_size
            self.reserve(self.length + len(nodes))
            dst = range(self.length, self.length + len(nodes))
            dev = self.pool.device
            d_blk = torch.tensor([self.blocks[p // bs] for p in dst], device=dev)
            d_off = torch.tensor([p % bs for p in dst], device=dev)
            s_blk = torch.tensor([self.scratch[i // bs] for i in nodes], device=dev)
            s_off = torch.tensor([i % bs for i in nodes], device=dev)
            for cache in (self.pool.k, self.pool.v):  # [layers, blocks, heads, bs, D]
                cache[:, d_blk, :, d_off, :] = cache[:, s_blk, :, s_off, :]
            self.commit([self.scratch_tokens[i] for i in nodes])
        self.drop_scratch()

    def release(self) -> None:
        self.drop_scratch()
        self.pool.release(self.blocks)
        self.blocks, self.tokens, self.keys, self._table = [], [], [], None
