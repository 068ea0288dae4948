"""Random paged-attention problems: a block pool, block tables and chain / tree masks.

The mask of each case is written out with loops from the parents of a random tree (or a causal
chain), independently of PagedLayout, so tests can check the layout's rule as well as the
kernels that implement it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.paged_attention import PagedLayout


@dataclass
class PagedCase:
    q: torch.Tensor  # [B, H, T, D]
    k_cache: torch.Tensor  # [num_blocks, Hkv, bs, D]
    v_cache: torch.Tensor
    layout: PagedLayout
    mask: torch.Tensor  # [B, 1, T, K] bool, written out


def random_parents(n: int, gen: torch.Generator) -> list[int]:
    return [int(torch.randint(-1, i, (1,), generator=gen)) if i else -1 for i in range(n)]


def ancestors(parents: list[int], i: int) -> set[int]:
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


def random_case(seed: int, dtype: torch.dtype = torch.float32, max_nodes: int = 64) -> PagedCase:
    """B sequences, each a causal chain of new tokens or a tree (one with a single node now and
    then), prefixes of any length (block boundaries straddled), GQA groups 1-4, odd head dims."""
    gen = torch.Generator().manual_seed(seed)

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    B, n_kv, G = pick(1, 2, 3), pick(1, 2), pick(1, 2, 4)
    D, bs = pick(16, 24, 64), pick(4, 16)
    seqs = []
    for _ in range(B):
        past = int(torch.randint(0, 3 * bs + 2, (1,), generator=gen))
        if pick(True, False):
            n = pick(1, 1, 5, int(torch.randint(2, max_nodes + 1, (1,), generator=gen)))
            seqs.append(("tree", max(past, 1), random_parents(n, gen)))
        else:
            seqs.append(("chain", past, int(torch.randint(1, 20, (1,), generator=gen))))
    T = max(len(s[2]) if s[0] == "tree" else s[2] for s in seqs)

    # Per sequence: committed blocks, then (trees) scratch blocks; all drawn from a shuffled pool.
    slots = []
    for kind, past, spec in seqs:
        if kind == "chain":
            slots.append(((past + spec + bs - 1) // bs, 0))
        else:
            slots.append(((past + bs - 1) // bs, (len(spec) + bs - 1) // bs))
    num_blocks = sum(a + b for a, b in slots) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, prefix, tstart, bits, klen = [], [], [], [], []
    K = 0
    for (kind, past, spec), (nb, ns) in zip(seqs, slots, strict=True):
        ids, order = order[: nb + ns], order[nb + ns :]
        tables.append(ids)
        if kind == "chain":
            prefix.append([past + t + 1 if t < spec else max(past, 1) for t in range(T)])
            tstart.append(0)
            bits.append([0] * T)
            klen.append(past + spec)
        else:
            at = nb * bs
            prefix.append([past] * T)
            tstart.append(at)
            row = []
            for t in range(T):
                if t < len(spec):
                    m = sum(1 << a for a in ancestors(spec, t))
                    row.append(m - (1 << 64) if m >= 1 << 63 else m)  # as a signed int64
                else:
                    row.append(0)
            bits.append(row)
            klen.append(at + len(spec))
        K = max(K, klen[-1])
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables], dtype=torch.int32)

    mask = torch.zeros(B, 1, T, K, dtype=torch.bool)
    for b, (kind, past, spec) in enumerate(seqs):
        for t in range(T):
            if kind == "chain":
                mask[b, 0, t, : prefix[b][t]] = True
            else:
                mask[b, 0, t, :past] = True
                if t < len(spec):
                    for a in ancestors(spec, t):
                        mask[b, 0, t, tstart[b] + a] = True
    layout = PagedLayout(
        table=table,
        prefix=torch.tensor(prefix, dtype=torch.int32),
        tree_start=torch.tensor(tstart, dtype=torch.int32),
        tree_bits=torch.tensor(bits, dtype=torch.int64),
        key_len=torch.tensor(klen, dtype=torch.int32),
        max_key_len=K,
    )
    H = n_kv * G
    q = torch.randn(B, H, T, D, generator=gen).to(dtype)
    k_cache = torch.randn(num_blocks, n_kv, bs, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, n_kv, bs, D, generator=gen).to(dtype)
    return PagedCase(q, k_cache, v_cache, layout, mask)


def verify_case(
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    prefix: int,
    nodes: int,
    dtype: torch.dtype,
    device: str,
    block_size: int = 16,
    seed: int = 0,
) -> PagedCase:
    """A verification-shaped problem at benchmark sizes: `batch` sequences with `prefix` cached
    tokens in shuffled pool blocks, each checking a random tree of `nodes` nodes in scratch."""
    gen = torch.Generator().manual_seed(seed)
    prefix_blocks, tree_blocks = -(-prefix // block_size), -(-nodes // block_size)
    per_seq = prefix_blocks + tree_blocks
    order = torch.randperm(batch * per_seq, generator=gen).view(batch, per_seq)
    parents = [random_parents(nodes, gen) for _ in range(batch)]
    bits = torch.zeros(batch, nodes, dtype=torch.int64)
    mask = torch.zeros(batch, 1, nodes, prefix_blocks * block_size + nodes, dtype=torch.bool)
    at = prefix_blocks * block_size
    for b in range(batch):
        mask[b, 0, :, :prefix] = True
        for t in range(nodes):
            for a in ancestors(parents[b], t):
                bits[b, t] |= torch.tensor(1, dtype=torch.int64) << a
                mask[b, 0, t, at + a] = True
    layout = PagedLayout(
        table=order.to(torch.int32).to(device),
        prefix=torch.full((batch, nodes), prefix, dtype=torch.int32, device=device),
        tree_start=torch.full((batch,), at, dtype=torch.int32, device=device),
        tree_bits=bits.to(device),
        key_len=torch.full((batch,), at + nodes, dtype=torch.int32, device=device),
        max_key_len=at + nodes,
    )
    shape = (batch * per_seq, kv_heads, block_size, head_dim)
    return PagedCase(
        q=torch.randn(batch, heads, nodes, head_dim, generator=gen).to(device, dtype),
        k_cache=torch.randn(*shape, generator=gen).to(device, dtype),
        v_cache=torch.randn(*shape, generator=gen).to(device, dtype),
        layout=layout,
        mask=mask.to(device),
    )
