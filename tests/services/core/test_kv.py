"""The block pool: preallocation, content-addressed sharing of full committed blocks,
immutability under tree verification and rollback, and the LRU cache of released blocks.

Tiny random engines with 4-token blocks; "bit-identical" means torch.equal."""

import random

import pytest
import torch
from tiny_models import tiny_config

from services.core.attention_batch import AttentionBatch
from services.core.block_keys import chain_keys
from services.core.engine import Engine
from services.core.errors import ResourceExhausted
from services.core.kv import BlockPool, SequenceKV
from services.core.params import SamplingConfig
from services.core.spec import Rule
from services.core.verification import verify_round

BS = 4
TOL = 1e-4


@pytest.fixture
def engine() -> Engine:
    return Engine.from_config(tiny_config(), seed=1, block_size=BS, max_kv_tokens=64 * BS, digest="d0")


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 97) for _ in range(n)]


def full_logits(engine: Engine, tokens: list[int]) -> torch.Tensor:
    seq = SequenceKV(BlockPool(engine.config, block_size=BS, max_blocks=64))  # a pool of its own
    out = engine.extend(seq, tokens)
    seq.release()
    return out


def snapshot(engine: Engine, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return engine.pool.k[:, blocks].clone(), engine.pool.v[:, blocks].clone()


def probe(engine: Engine, seq: SequenceKV, token: int) -> torch.Tensor:
    """Logits after one more token, leaving the sequence as it was."""
    length = seq.length
    out = engine.decode(seq, token)
    seq.truncate(length)
    return out


# --- preallocation -----------------------------------------------------------------------------


def test_pool_is_allocated_once_and_never_grows(engine: Engine) -> None:
    pool = engine.pool
    assert pool.k.shape[1] == pool.max_blocks == 64
    ptr = pool.k.data_ptr()
    seqs = [engine.new_sequence() for _ in range(4)]
    for i, s in enumerate(seqs):
        engine.prefill(s, ids(60, i))  # 15 blocks each: 60 of 64
    assert pool.k.data_ptr() == ptr and pool.k.shape[1] == 64
    assert pool.free_blocks == 4
    with pytest.raises(ResourceExhausted, match="KV cache full"):
        engine.prefill(engine.new_sequence(), ids(20, 9))
    assert pool.free_blocks == 4  # the refused forward returned what it had reserved


def test_a_batch_refused_for_room_returns_every_reservation() -> None:
    engine = Engine.from_config(tiny_config(), block_size=BS, max_kv_tokens=8 * BS)
    with pytest.raises(ResourceExhausted):
        engine.forward([engine.new_sequence(), engine.new_sequence()], [ids(2 * BS, 22), ids(7 * BS, 23)])
    assert engine.pool.free_blocks == 8


def test_blocks_are_zeroed_when_first_handed_out_only() -> None:
    pool = BlockPool(tiny_config(), block_size=BS, max_blocks=4)
    pool.k.fill_(float("nan"))  # whatever torch.empty left there
    pool.v.fill_(float("nan"))
    (a,) = pool.allocate(1)
    assert pool.k[:, a].eq(0).all() and pool.v[:, a].eq(0).all()
    pool.k[:, a] = 7.0
    pool.release([a])
    (again,) = pool.allocate(1)
    assert again == a and pool.k[:, a].eq(7.0).all()  # reused, not re-zeroed
    assert pool.k[:, [b for b in range(4) if b != a]].isnan().all()  # untouched blocks stay unmapped


# --- sharing -----------------------------------------------------------------------------------


def test_common_prefix_shares_blocks_and_survives_the_other_release(engine: Engine) -> None:
    prefix = ids(2 * BS, 0)
    a, b = engine.new_sequence(), engine.new_sequence()
    engine.prefill(a, prefix + ids(3, 1))
    logits_b, cached = engine.prefill_cached(b, prefix + ids(2, 2))
    assert cached == 2 * BS
    assert b.blocks[:2] == a.blocks[:2]
    assert [engine.pool.refcount(x) for x in a.blocks[:2]] == [2, 2]
    assert b.keys == a.keys == chain_keys("d0", "float32", prefix, BS)
    assert (logits_b - full_logits(engine, prefix + ids(2, 2))[-1]).abs().max() <= TOL

    before = probe(engine, b, 5)
    a.release()
    assert [engine.pool.refcount(x) for x in b.blocks[:2]] == [1, 1]
    filler = engine.new_sequence()
    engine.prefill(filler, ids(40, 3))  # takes (and overwrites) every block a freed
    assert torch.equal(probe(engine, b, 5), before)


def test_a_sequence_that_completes_a_known_block_switches_to_it(engine: Engine) -> None:
    prefix = ids(2 * BS, 4)
    a, b = engine.new_sequence(), engine.new_sequence()
    engine.prefill(a, prefix)
    free = engine.pool.free_blocks
    engine.prefill(b, prefix[:3])  # no cache use: b computes the prefix itself...
    for t in prefix[3:]:
        engine.decode(b, t)
    assert b.blocks == a.blocks  # ...and adopts a's blocks as each one fills
    assert engine.pool.free_blocks == free  # its own copies went back
    assert (probe(engine, b, 9) - full_logits(engine, prefix + [9])[-1]).abs().max() <= TOL


def test_released_blocks_stay_cached_until_their_space_is_needed(engine: Engine) -> None:
    prefix = ids(3 * BS, 5)
    a = engine.new_sequence()
    engine.prefill(a, prefix + [1])
    held = list(a.blocks[:3])
    a.release()
    assert engine.pool.cached_blocks == 3
    b = engine.new_sequence()
    _, cached = engine.prefill_cached(b, prefix + [2])
    assert cached == 3 * BS and b.blocks[:3] == held
    b.release()
    keys = chain_keys("d0", "float32", prefix, BS)
    # Fill the pool: cached blocks are taken last, the least recently released first, and a
    # released chain is released tail first.
    hog = engine.new_sequence()
    engine.prefill(hog, ids((engine.pool.free_blocks - 3) * BS, 6))
    assert [engine.pool.lookup(k) for k in keys] == held
    engine.extend(hog, ids(BS, 7))  # one more block: evicts one cached block
    assert [engine.pool.lookup(k) is None for k in keys] == [False, False, True]
    hog.release()
    c = engine.new_sequence()
    assert engine.prefill_cached(c, prefix + [3])[1] == 2 * BS  # the chain stops at the first miss


def test_the_prefix_cache_cap_bounds_touched_memory() -> None:
    capped = Engine.from_config(
        tiny_config(), seed=1, block_size=BS, max_kv_tokens=64 * BS, prefix_cache_tokens=4 * BS, digest="d0"
    )
    pool = capped.pool
    first = ids(3 * BS, 11)
    for seed in range(12):  # twelve different 3-block prompts, one after the other
        seq = capped.new_sequence()
        capped.prefill(seq, (first if seed == 0 else ids(3 * BS, 20 + seed)) + [1])
        seq.release()
        assert pool.cached_blocks <= 4
    # only the newest 4 blocks stay cached; the oldest prompt is gone, the newest is not
    assert pool.lookup(chain_keys("d0", "float32", first, BS)[0]) is None
    newest = chain_keys("d0", "float32", ids(3 * BS, 31), BS)
    assert all(pool.lookup(k) is not None for k in newest)
    # memory capped out is reused, and live blocks take cached ones once the cap is resident:
    # max(cap 4, a working set of 4) blocks were ever touched, not one set per prompt
    assert pool.resident_blocks == sum(pool._touched) == 4

    # a Redis-sized restore larger than the cap is still adopted whole (insert does not trim)
    restored = ids(6 * BS, 40)
    blocks = [
        (k, torch.randn(*pool.k[:, 0].shape), torch.randn(*pool.v[:, 0].shape))
        for k in chain_keys("d0", "float32", restored, BS)
    ]
    for key, k, v in blocks:
        assert pool.insert_cached(key, k, v)
    seq = capped.new_sequence()
    assert seq.adopt_cached(restored + [1]) == 6 * BS
    seq.release()
    assert pool.cached_blocks == 4


def test_live_blocks_take_the_oldest_cached_ones_before_new_memory_once_the_cap_is_resident() -> None:
    engine = Engine.from_config(
        tiny_config(), seed=1, block_size=BS, max_kv_tokens=64 * BS, prefix_cache_tokens=4 * BS, digest="d0"
    )
    pool = engine.pool
    a = ids(4 * BS, 50)
    seq = engine.new_sequence()
    engine.prefill(seq, a + [1])  # 5 blocks, 4 of them sealed
    seq.release()
    assert (pool.resident_blocks, pool.cached_blocks) == (5, 4)
    keys = chain_keys("d0", "float32", a, BS)
    seq = engine.new_sequence()
    engine.prefill(seq, ids(2 * BS, 51) + [1])  # 3 blocks: the free tail, then 2 cached ones
    assert pool.resident_blocks == 5  # no new memory touched (the old rule grew to 7)
    # a chain is cached last block first, so its end goes first and its head still hits
    assert [pool.lookup(k) is None for k in keys] == [False, False, True, True]
    seq.release()
    big = engine.new_sequence()
    engine.prefill(big, ids(8 * BS, 52))  # more than the cap: live sequences still grow the pool
    assert pool.resident_blocks == 8 and pool.cached_blocks == 0
    big.release()


def test_adoption_leaves_the_last_token_to_compute(engine: Engine) -> None:
    prefix = ids(2 * BS, 8)
    a = engine.new_sequence()
    engine.prefill(a, prefix)
    b = engine.new_sequence()
    logits, cached = engine.prefill_cached(b, prefix)  # exactly two blocks: the second is recomputed
    assert cached == BS and b.length == 2 * BS
    assert (logits - full_logits(engine, prefix)[-1]).abs().max() <= TOL
    assert b.blocks == a.blocks  # and then switched to the cached one when it filled


def test_a_different_model_digest_shares_nothing(engine: Engine) -> None:
    other = Engine.from_config(tiny_config(), seed=1, block_size=BS, digest="d1")
    assert other.pool.block_key(None, [1, 2, 3, 4]) != engine.pool.block_key(None, [1, 2, 3, 4])


def test_an_int8_engine_keys_its_blocks_apart(engine: Engine) -> None:
    fp32_key = engine.pool.block_key(None, [1, 2, 3, 4])
    s = engine.new_sequence()
    engine.prefill(s, ids(BS, 21))
    with pytest.raises(RuntimeError, match="hold blocks"):
        engine.pool.rename("d0+int8")
    s.release()
    if not engine.quantize_int8():
        pytest.skip("the fbgemm quantized kernels are not available")
    assert engine.pool.digest == "d0+int8" and engine.pool.cached_blocks == 0
    assert engine.pool.block_key(None, [1, 2, 3, 4]) != fp32_key


# --- immutability ------------------------------------------------------------------------------


def test_tree_verify_and_rollback_never_write_shared_blocks(engine: Engine) -> None:
    prefix = ids(2 * BS, 10)
    a, b = engine.new_sequence(), engine.new_sequence()
    engine.prefill(a, prefix + [4])
    engine.prefill_cached(b, prefix + [5])
    shared = a.blocks[:2]
    kv_before, logits_before = snapshot(engine, shared), probe(engine, a, 6)

    # b: a verification round (chain of 2 new tokens + a 5-node tree), then rollbacks into and
    # below the shared blocks, then new tokens where the shared ones were.
    tree_tokens, tree_parents = ids(5, 11), [-1, -1, 0, 0, 2]
    verify_round(engine, b, ids(2, 12), tree_tokens, tree_parents, {}, SamplingConfig(), Rule.GREEDY, None)
    assert not b.scratch and engine.pool.refcount(shared[0]) == 2
    b.truncate(2 * BS - 1)  # into the second shared block: b gets a private copy
    assert b.blocks[0] == shared[0] and b.blocks[1] != shared[1]
    assert engine.pool.refcount(shared[1]) == 1
    engine.extend(b, ids(3, 13))
    b.truncate(BS - 2)  # and into the first
    engine.extend(b, ids(6, 14))

    kv_after = snapshot(engine, shared)
    assert torch.equal(kv_after[0], kv_before[0]) and torch.equal(kv_after[1], kv_before[1])
    assert torch.equal(probe(engine, a, 6), logits_before)
    expect = full_logits(engine, prefix[: BS - 2] + ids(6, 14) + [8])[-1]
    assert (probe(engine, b, 8) - expect).abs().max() <= TOL  # b's copies are right too


def test_rollback_into_a_sole_owned_block_unseals_it(engine: Engine) -> None:
    prefix = ids(2 * BS, 15)
    a = engine.new_sequence()
    engine.prefill(a, prefix)
    keys = list(a.keys)
    a.truncate(2 * BS - 2)
    assert engine.pool.lookup(keys[1]) is None  # its content is about to change
    assert engine.pool.lookup(keys[0]) == a.blocks[0]
    engine.extend(a, [7, 8])  # written in place: a owned the block alone
    c = engine.new_sequence()
    logits, cached = engine.prefill_cached(c, prefix + [9])
    assert cached == BS  # the stale second block is not offered
    assert (logits - full_logits(engine, prefix + [9])[-1]).abs().max() <= TOL


def test_tree_nodes_live_in_scratch_blocks(engine: Engine) -> None:
    s = engine.new_sequence()
    engine.prefill(s, ids(BS + 1, 16))  # a partly filled tail block
    blocks = list(s.blocks)
    tail_before = snapshot(engine, blocks[-1:])
    engine.forward_tree(s, ids(6, 17), [-1, 0, 0, 1, 1, 2])
    assert s.blocks == blocks and s.length == BS + 1 and s.scratch_len == 6
    assert len(s.scratch) == 2 and not set(s.scratch) & set(blocks)
    tail_after = snapshot(engine, blocks[-1:])
    assert torch.equal(tail_before[0], tail_after[0])  # the tail's free slots were not used
    s.truncate(s.length)
    assert not s.scratch and s.scratch_len == 0


# --- devices -----------------------------------------------------------------------------------


def test_batch_layout_tensors_live_on_the_pool_device() -> None:
    """Built on the meta device: a tensor made on the CPU by mistake would show up here."""
    pool = BlockPool(tiny_config(), block_size=BS, max_blocks=8, device="meta")
    seqs = [SequenceKV(pool), SequenceKV(pool)]
    seqs[0].reserve(5)
    seqs[0].commit(ids(5, 18))
    batch = AttentionBatch.build(seqs, [[1, 2], [3]], [torch.ones(2, 2, dtype=torch.bool).tril(), None])
    tensors = [batch.write_rows, batch.write_blk, batch.write_off, batch.gather_idx, batch.mask]
    assert [t.device.type for t in tensors] == ["meta"] * 5
    assert seqs[1].table().device.type == "meta"


def test_engine_tensors_follow_the_device_argument() -> None:
    engine = Engine.from_config(tiny_config(), block_size=BS, device="cpu")
    seq = engine.new_sequence()
    logits = engine.prefill(seq, ids(6, 19))
    assert engine.pool.k.device.type == "cpu" and engine.model.rotary.cos.device.type == "cpu"
    assert logits.device.type == "cpu" and next(engine.model.parameters()).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_matches_cpu() -> None:
    cpu = Engine.from_config(tiny_config(), seed=1, block_size=BS)
    cuda = Engine.from_config(tiny_config(), seed=1, block_size=BS, device="cuda")
    assert cuda.pool.k.device.type == "cuda"
    prompt, tree_tokens, parents = ids(9, 20), ids(4, 21), [-1, 0, 0, 1]
    out = []
    for eng in (cpu, cuda):
        seq = eng.new_sequence()
        first = eng.prefill(seq, prompt)
        tree, _ = eng.forward_tree(seq, tree_tokens, parents)
        eng.accept_path(seq, [0, 1])
        out.append(torch.cat([first[None], tree, eng.decode(seq, 3)[None]]))
    assert out[1].device.type == "cpu"  # results come back to the host
    assert (out[0] - out[1]).abs().max() <= TOL


def test_on_seal_hears_of_kv_computed_here_only(engine: Engine) -> None:
    heard: list[tuple[int, bytes]] = []
    engine.pool.on_seal = lambda block, key: heard.append((block, key))
    prompt = ids(3 * BS + 1, seed=11)
    a = engine.new_sequence()
    engine.prefill(a, prompt)
    assert [key for _, key in heard] == a.keys and [b for b, _ in heard] == a.blocks[:3]
    b = engine.new_sequence()
    engine.prefill(b, prompt)  # the same blocks again: sealed onto the existing ones, not published
    assert len(heard) == 3 and b.blocks[:3] == a.blocks[:3]


def test_inserted_blocks_are_adopted_and_give_the_computed_logits(engine: Engine) -> None:
    """A block restored from elsewhere (another replica's pool) joins the cache and serves
    prefill_cached as if computed here."""
    other = Engine.from_config(tiny_config(), seed=1, block_size=BS, max_kv_tokens=64 * BS, digest="d0")
    prompt = ids(4 * BS + 2, seed=12)
    src = other.new_sequence()
    other.prefill(src, prompt)
    k, v = snapshot(other, src.blocks[:4])  # [layers, 4, heads, bs, D]
    seq = engine.new_sequence()
    keys = seq.continuation_keys(prompt)
    assert keys == src.keys
    for i, key in enumerate(keys[:3]):  # the fourth block stays missing
        assert engine.pool.insert_cached(key, k[:, i], v[:, i])
    assert engine.pool.cached_blocks == 3
    logits, cached = engine.prefill_cached(seq, prompt)
    assert cached == 3 * BS
    assert torch.allclose(logits, full_logits(engine, prompt)[-1], atol=TOL)


def test_insert_cached_refuses_when_every_block_is_referenced() -> None:
    engine = Engine.from_config(tiny_config(), seed=1, block_size=BS, max_kv_tokens=2 * BS, digest="d0")
    seq = engine.new_sequence()
    engine.prefill(seq, ids(2 * BS, seed=13))
    shape = engine.pool.block_shape
    assert not engine.pool.insert_cached(bytes(32), torch.zeros(shape), torch.zeros(shape))


def test_continuation_keys_leave_the_last_token_and_need_a_block_boundary(engine: Engine) -> None:
    prompt = ids(2 * BS, seed=14)
    seq = engine.new_sequence()
    assert len(seq.continuation_keys(prompt)) == 1  # the last token is always computed
    assert len(seq.continuation_keys(prompt, keep=0)) == 2
    engine.prefill(seq, prompt[:3])
    assert seq.continuation_keys(prompt[3:]) == []  # mid-block: nothing to adopt


def test_a_verify_round_resent_whole_adopts_the_cached_prefix(engine: Engine) -> None:
    """After a failover the gateway re-sends the whole session as one round's new tokens: the
    round shares the prefix blocks another sequence holds and decides exactly as a fresh one."""
    history = ids(3 * BS + 2, seed=15)
    tree_tokens, tree_parents = ids(4, 16), [-1, 0, -1, 2]

    def round_on(seq: SequenceKV):
        return verify_round(
            engine, seq, history, tree_tokens, tree_parents, {}, SamplingConfig(), Rule.GREEDY, None
        )

    fresh = round_on(engine.new_sequence())
    held = engine.new_sequence()
    engine.prefill(held, history)
    again = engine.new_sequence()
    result = round_on(again)
    assert again.blocks[:3] == held.blocks[:3]  # shared, not recomputed
    assert (result.acceptance.path, result.acceptance.next_token) == (
        fresh.acceptance.path,
        fresh.acceptance.next_token,
    )
    assert again.tokens == history + [tree_tokens[i] for i in result.acceptance.path]


def test_gather_in_a_compute_dtype_holds_the_same_keys(engine: Engine) -> None:
    """A batch with compute_dtype float64 (the q4_1 weights' attention) gathers exactly the keys
    and values of the plain gather, converted, for one sequence and a ragged batch with a tree."""
    seqs = [engine.new_sequence() for _ in range(3)]
    for s, n in zip(seqs, (3, 9, 14), strict=True):
        engine.prefill(s, ids(n, n))
    tokens = [[5], [6, 7], [8, 9, 10]]
    trees = [None, None, torch.ones(3, 3, dtype=torch.bool).tril()]
    for group in ([seqs[0]], seqs):
        plain = AttentionBatch.build(group, tokens[: len(group)], trees[: len(group)])
        wide = AttentionBatch.build(group, tokens[: len(group)], trees[: len(group)], torch.float64)
        for layer in range(engine.config.num_hidden_layers):
            for a, b in zip(plain.gather(layer), wide.gather(layer), strict=True):
                assert b.dtype == torch.float64 and torch.equal(a.double(), b)
        for s in group:
            s.truncate(s.length)
