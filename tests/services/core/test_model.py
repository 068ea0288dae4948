"""KV equivalence on random tiny configs: incremental decode, batched prefill and the
tree-masked forward must give the logits of one full causal forward (<= 1e-4), and the
engine must match transformers' LlamaForCausalLM on the same random weights."""

import random

import pytest
import torch
from tiny_models import tiny_config

from services.core.engine import Engine

TOL = 1e-4

CONFIGS = {
    "tied-gqa": tiny_config(),
    "untied-mha": tiny_config(num_key_value_heads=6, tie_word_embeddings=False),
    "llama3-rope": tiny_config(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
}


def full_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    seq = engine.new_sequence()
    out = engine.extend(seq, ids)
    seq.release()
    return out


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def engine(request) -> Engine:
    return Engine.from_config(CONFIGS[request.param], seed=1, block_size=4)


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def test_incremental_decode_matches_full_forward(engine: Engine) -> None:
    ids = random_ids(23, engine.config.vocab_size, 0)
    ref = full_logits(engine, ids)
    seq = engine.new_sequence()
    first = engine.extend(seq, ids[:7])
    steps = [engine.decode(seq, t) for t in ids[7:]]
    got = torch.cat([first, torch.stack(steps)])
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= TOL
    assert seq.length == len(ids)


def test_chunked_prefill_across_block_boundaries(engine: Engine) -> None:
    ids = random_ids(30, engine.config.vocab_size, 1)
    ref = full_logits(engine, ids)
    seq = engine.new_sequence()
    parts = [engine.extend(seq, ids[a:b]) for a, b in [(0, 3), (3, 4), (4, 13), (13, 30)]]
    assert (torch.cat(parts) - ref).abs().max() <= TOL


def test_batched_prefill_of_unequal_lengths(engine: Engine) -> None:
    prompts = [random_ids(n, engine.config.vocab_size, 10 + n) for n in (5, 17, 1, 9)]
    # Give two sequences a cached prefix first so the batch mixes past lengths.
    seqs = [engine.new_sequence() for _ in prompts]
    engine.extend(seqs[1], prompts[1][:6])
    engine.extend(seqs[3], prompts[3][:2])
    rest = [prompts[0], prompts[1][6:], prompts[2], prompts[3][2:]]
    logits, _ = engine.forward(seqs, rest)
    for b, p in enumerate(prompts):
        ref = full_logits(engine, p)[-len(rest[b]) :]
        assert (logits[b] - ref).abs().max() <= TOL, b
    last, _ = engine.forward([engine.new_sequence(), engine.new_sequence()], prompts[:2], last_only=True)
    assert (last[1][0] - full_logits(engine, prompts[1])[-1]).abs().max() <= TOL


def test_tree_forward_matches_each_path(engine: Engine) -> None:
    vocab = engine.config.vocab_size
    prefix = random_ids(11, vocab, 2)
    #        0     1    2    3    4    5    6    7
    parents = [-1, -1, 0, 0, 1, 2, 5, 3]
    tokens = random_ids(len(parents), vocab, 3)
    seq = engine.new_sequence()
    engine.extend(seq, prefix)
    tree_logits, _ = engine.forward_tree(seq, tokens, parents)
    for node in range(len(parents)):
        path = []
        i = node
        while i >= 0:
            path.append(i)
            i = parents[i]
        path.reverse()
        ref = full_logits(engine, prefix + [tokens[i] for i in path])[-1]
        assert (tree_logits[node] - ref).abs().max() <= TOL, node


def test_accept_path_compacts_tree_kv(engine: Engine) -> None:
    vocab = engine.config.vocab_size
    prefix = random_ids(9, vocab, 4)
    parents = [-1, -1, 0, 1, 3, 2]
    tokens = random_ids(len(parents), vocab, 5)
    path = [1, 3, 4]
    seq = engine.new_sequence()
    engine.extend(seq, prefix)
    engine.forward_tree(seq, tokens, parents)
    engine.accept_path(seq, path)
    assert seq.length == len(prefix) + len(path)
    nxt = 7
    got = engine.decode(seq, nxt)
    ref = full_logits(engine, prefix + [tokens[i] for i in path] + [nxt])[-1]
    assert (got - ref).abs().max() <= TOL


def test_release_returns_blocks(engine: Engine) -> None:
    free = engine.pool.free_blocks
    seq = engine.new_sequence()
    engine.extend(seq, random_ids(37, engine.config.vocab_size, 6))
    assert engine.pool.free_blocks < free
    seq.release()
    assert engine.pool.free_blocks == free


def test_matches_transformers_on_random_weights(engine: Engine) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = engine.config
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = engine.model
    layers = []
    for i, layer in enumerate(ours.layers):
        q, k, v = layer.self_attn.qkv_proj.weight.split(layer.self_attn.split)
        g, u = layer.mlp.gate_up_proj.weight.chunk(2)
        layers.append((i, q, k, v, g, u, layer))
    state = {"model.embed_tokens.weight": ours.embed_tokens.weight, "model.norm.weight": ours.norm.weight}
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = ours.lm_head.weight
    for i, q, k, v, g, u, layer in layers:
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": layer.self_attn.o_proj.weight,
            p + "mlp.gate_proj.weight": g,
            p + "mlp.up_proj.weight": u,
            p + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
            p + "input_layernorm.weight": layer.input_layernorm.weight,
            p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
        }
    hf.load_state_dict(state, strict=False)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    ids = random_ids(40, cfg.vocab_size, 7)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (full_logits(engine, ids) - ref).abs().max() <= TOL


def test_tree_grown_level_by_level_matches_one_shot(engine: Engine) -> None:
    vocab = engine.config.vocab_size
    prefix = random_ids(6, vocab, 8)
    parents = [-1, -1, 0, 0, 1, 2, 4, 4]
    tokens = random_ids(len(parents), vocab, 9)
    seq = engine.new_sequence()
    engine.extend(seq, prefix)
    one_shot, _ = engine.forward_tree(seq, tokens, parents)
    seq.truncate(len(prefix))  # drops the tree
    levels = [(0, 2), (2, 5), (5, 8)]  # node ranges added per forward
    grown = []
    for a, b in levels:
        logits, _ = engine.forward_tree(seq, tokens[a:b], parents[:b])
        grown.append(logits)
    assert (torch.cat(grown) - one_shot).abs().max() <= TOL


def test_logit_rows_select_rows(engine: Engine) -> None:
    ids = random_ids(9, engine.config.vocab_size, 10)
    ref = full_logits(engine, ids)
    seq = engine.new_sequence()
    (rows,), _ = engine.forward([seq], [ids], logit_rows=[[0, 4, 8]])
    assert (rows - ref[[0, 4, 8]]).abs().max() <= TOL


def test_packed_engine_matches_unpacked(engine: Engine) -> None:
    """Packing changes only how the projections are computed: decode, tree forwards and a
    restricted head give the unpacked engine's logits."""
    packed = Engine.from_config(engine.config, seed=1, block_size=4)
    if not packed.pack_weights():
        pytest.skip("oneDNN is not available")
    vocab = engine.config.vocab_size
    prefix, tokens = random_ids(9, vocab, 4), random_ids(6, vocab, 5)
    parents = [-1, 0, 0, 1, 2, 3]
    out = []
    for eng in (engine, packed):
        seq = eng.new_sequence()
        eng.extend(seq, prefix)
        out.append((eng.forward_tree(seq, tokens, parents)[0], eng.decode(seq, tokens[0])))
        seq.release()
    assert (out[0][0] - out[1][0]).abs().max() <= TOL and (out[0][1] - out[1][1]).abs().max() <= TOL
    subset = random.Random(0).sample(range(vocab), 10)
    engine.restrict_vocab(subset)
    packed.restrict_vocab(subset)
    assert packed.model.lm_head.packed is not None  # the new head is packed too
    a, b = (full_logits(e, prefix + tokens[:4])[-4:] for e in (engine, packed))
    assert a.shape == (4, 10) and (a - b).abs().max() <= TOL


def test_int8_engine_tracks_fp32_and_keeps_its_head_quantized(engine: Engine) -> None:
    """A draft engine on int8 weights: logits close to fp32, the same argmax almost
    everywhere; restricting the vocabulary afterwards keeps the new head int8, and packing
    skips what int8 serves."""
    quant = Engine.from_config(engine.config, seed=1, block_size=4)
    if not quant.quantize_int8():
        pytest.skip("the fbgemm quantized kernels are not available")
    assert quant.pack_weights() == 0  # every projection is int8: nothing left to pack
    ids = random_ids(24, engine.config.vocab_size, 6)
    ref, out = full_logits(engine, ids), full_logits(quant, ids)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    subset = random.Random(1).sample(range(engine.config.vocab_size), 10)
    quant.restrict_vocab(subset)
    assert quant.model.lm_head.int8 is not None
    assert full_logits(quant, ids).shape == (24, 10)


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_the_configs_and_survives_a_restricted_head(tied: bool) -> None:
    """ModelInfo.parameters and `specmesh models list` (count_parameters of the config) agree,
    before and after a draft restricts its head to a subset of the vocabulary."""
    engine = Engine.from_config(tiny_config(tie_word_embeddings=tied), block_size=4)
    loaded = sum(p.numel() for p in engine.model.parameters())  # tied tensors count once
    assert engine.parameter_count() == loaded
    engine.restrict_vocab(random.Random(2).sample(range(engine.config.vocab_size), 10))
    assert engine.parameter_count() == loaded
