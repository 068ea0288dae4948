"""Draft training: slicing, saving, the loss, batched labelling, a tiny training run, the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from services.core import model_store as ms
from services.core.config import LlamaConfig
from services.core.engine import Engine
from services.core.loaders.hf_dir import load_hf_dir
from services.draft.training.checkpoint import REPORT_FILE
from services.draft.training.evaluation import expected_tau
from services.draft.training.labels import label_tokens
from services.draft.training.loss import sparse_kl
from services.draft.training.recipe import DraftRecipe
from services.draft.training.tmodel import TrainLlama, generate_batch
from services.draft.training.train import train_draft
from services.draft.training.vocab import build_draft_vocab

TINY_PROMPTS = [f"Question number {i}: what is in the {w}?" for i, w in enumerate("abcdefghijkl")]
TINY_DOCS = [
    "the cat sat in the hat and the wind was on the water " * 20,
    "def f(x):\n    return x + 1\n" * 30,
]


def tiny_llama(seed: int = 0, **overrides) -> TrainLlama:
    base = dict(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=2,
    )
    base.update(overrides)
    torch.manual_seed(seed)
    m = TrainLlama(LlamaConfig(**base))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m.eval()


def tiny_recipe(**kw) -> DraftRecipe:
    base = dict(
        num_layers=1,
        draft_vocab_size=64,
        top_k=4,
        seq_len=16,
        corpus_batch=2,
        chat_batch=3,
        gen_batch=4,
        max_new_tokens=6,
        n_eval=3,
        eval_max_new_tokens=6,
        eval_every_s=0.0,
        warmup_steps=1,
        lr=1e-2,
        max_steps=5,
    )
    base.update(kw)
    return DraftRecipe(**base)


# --- pure pieces --------------------------------------------------------------------------------------


def test_layer_indices() -> None:
    assert DraftRecipe(num_layers=4).layer_indices(30) == [0, 1, 2, 3]
    assert DraftRecipe(num_layers=4, keep_last=1).layer_indices(30) == [0, 1, 2, 29]
    with pytest.raises(Exception, match="layers"):
        DraftRecipe(num_layers=31).layer_indices(30)


def test_sparse_kl_is_kl_up_to_entropy() -> None:
    torch.manual_seed(0)
    V = 7
    target = torch.randn(5, V).log_softmax(-1)
    logits = torch.randn(5, V)
    ids = torch.arange(V).expand(5, V).int()
    loss = sparse_kl(logits, ids, target.half(), None)
    p = target.half().float().softmax(-1)
    kl = (p * (p.log() - logits.log_softmax(-1))).sum(-1).mean()
    entropy = -(p * p.log()).sum(-1).mean()
    assert torch.allclose(loss, kl + entropy, atol=1e-5)


def test_sparse_kl_renormalises_over_draft_vocab() -> None:
    # ids outside the draft vocabulary drop out; the rest is renormalised
    vocab_map = torch.tensor([0, -1, 1])  # global ids 0 and 2 are draft columns 0 and 1
    ids = torch.tensor([[0, 1, 2]]).int()
    logp = torch.tensor([[0.5, 0.3, 0.2]]).log()
    logits = torch.tensor([[0.0, 1.0]])
    loss = sparse_kl(logits, ids, logp, vocab_map)
    p = torch.tensor([0.5, 0.2]) / 0.7
    assert torch.allclose(loss, -(p * logits.log_softmax(-1)[0]).sum(), atol=1e-3)


def test_build_draft_vocab_forced_then_frequency() -> None:
    from collections import Counter

    ids = build_draft_vocab(Counter({5: 10, 7: 3, 9: 1}), size=5, vocab=20, always=[2])
    assert ids[:4] == [2, 5, 7, 9] and len(ids) == 5 and len(set(ids)) == 5


def test_expected_tau() -> None:
    assert expected_tau(0.0, 4) == 1.0
    assert expected_tau(1.0, 4) == 5.0
    assert abs(expected_tau(0.5, 2) - 1.75) < 1e-9


# --- batched labelling -------------------------------------------------------------------------------


def _naive_greedy(m: TrainLlama, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            seq.append(int(m.logits(m(torch.tensor([seq]))[0, -1]).argmax()))
    return seq[len(prompt) :]


def test_generate_batch_matches_unbatched_greedy() -> None:
    m = tiny_llama()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33]]
    gens = generate_batch(m, prompts, max_new_tokens=8, eos_ids=[-1], top_k_store=5)
    for p, g in zip(prompts, gens, strict=True):
        assert g.tokens == _naive_greedy(m, p, 8)
        assert g.topk_ids.shape == (8, 5) and g.topk_logp.shape == (8, 5)
        assert torch.equal(g.topk_ids[:, 0].long(), torch.tensor(g.tokens))  # greedy = top-1


def test_generate_batch_stops_rows_at_eos() -> None:
    m = tiny_llama()
    prompts = [[5, 6, 7], [8, 9], [11, 12, 13]]
    free = generate_batch(m, prompts, max_new_tokens=10, eos_ids=[-1])
    eos = free[0].tokens[2]  # make row 0 stop at its third token
    gens = generate_batch(m, prompts, max_new_tokens=10, eos_ids=[eos])
    for f, g in zip(free, gens, strict=True):
        cut = next((i + 1 for i, t in enumerate(f.tokens) if t == eos), len(f.tokens))
        assert g.tokens == f.tokens[:cut]


def test_label_tokens_topk_are_normalised_logprobs() -> None:
    m = tiny_llama()
    toks = torch.randint(3, 100, (2, 9))
    ids, lps = label_tokens(m, toks, k=101, rows=5)
    with torch.no_grad():
        full = m.logits(m(toks)).log_softmax(-1)
    assert torch.allclose(lps.float().exp().sum(-1), torch.ones(2, 9), atol=1e-2)
    assert torch.allclose(full.gather(-1, ids.long()), lps.float(), atol=2e-3)


# --- saving, training, CLI on a tiny model ------------------------------------------------------------


def test_untrained_slice_of_tiny_model(tiny_target: Path, tmp_model_root: Path) -> None:
    out = train_draft("tiny", "tiny-draft", minutes=0, recipe=DraftRecipe(num_layers=1), log=lambda s: None)
    assert out == tmp_model_root / "tiny-draft"
    assert ms.verify_manifest(out)
    cfg, state = load_hf_dir(out)
    assert cfg.num_hidden_layers == 1
    _, tstate = load_hf_dir(tiny_target)
    assert torch.equal(
        state["model.layers.0.mlp.down_proj.weight"], tstate["model.layers.0.mlp.down_proj.weight"]
    )
    assert (out / "tokenizer.json").read_bytes() == (tiny_target / "tokenizer.json").read_bytes()
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["trained"] is False and report["recipe"]["layers_from_target"] == [0]
    Engine.from_dir(out)  # the serving engine loads it
    assert ms.resolve_model("tiny-draft") == out


def train_tiny(recipe: DraftRecipe | None = None, **data) -> Path:
    """A 5-step CPU training run of a 1-layer draft of the `tiny` target; `data` picks the sources."""
    return train_draft(
        "tiny",
        "tiny-draft",
        minutes=0.5,
        device="cpu",
        recipe=recipe or tiny_recipe(),
        progress=False,
        measure_cost=False,
        log=lambda s: None,
        **data,
    )


def test_tiny_training_run(tiny_target: Path, tmp_model_root: Path) -> None:
    before = load_hf_dir(
        train_draft("tiny", "tiny-slice", minutes=0, recipe=tiny_recipe(), log=lambda s: None)
    )[1]
    out = train_tiny(prompts=TINY_PROMPTS, documents=iter(TINY_DOCS * 50))
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["trained"] is True and report["steps"] == 5
    assert report["tokens_seen"] > 0 and report["chat"]["answers"] > 0
    final = report["eval"]["final"]
    assert 0.0 <= final["alpha"] <= 1.0 and final["eval_tokens"] > 0
    vocab = ms.load_draft_vocab(out)
    assert vocab is not None and len(vocab) == 64 and len(set(vocab)) == 64 and vocab[0] == 2  # eos first
    assert ms.load_draft_vocab(out, size=10) == vocab[:10]
    _, after = load_hf_dir(out)
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(
        after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"]
    )
    assert ms.verify_manifest(out)
    Engine.from_dir(out)


def test_cli_registers_train_draft(tiny_target: Path, tmp_model_root: Path, capsys) -> None:
    from specmesh.cli import train

    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "draft", "--target", "tiny", "--untrained", "--layers", "2"])
    assert args.func is train.run
    assert train.run(args) == 0
    out = tmp_model_root / "tiny-draft"
    assert LlamaConfig.load(out).num_hidden_layers == 2
    assert "untrained slice" in capsys.readouterr().out


def test_cli_rejects_cuda_without_gpu(tiny_target: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from specmesh.cli import train

    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "draft", "--target", "tiny", "--device", "cuda", "--untrained"])
    with pytest.raises(Exception, match="CUDA"):
        train.run(args)


# --- the real target -------------------------------------------------------------------------------


@pytest.mark.slow
def test_untrained_slice_of_smollm2_equals_target_prefix(smollm2_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    out = train_draft(smollm2_dir, "smol-draft", minutes=0, root=root, log=lambda s: None)
    assert ms.verify_manifest(out)
    cfg, tstate = load_hf_dir(smollm2_dir)
    n = LlamaConfig.load(out).num_hidden_layers
    assert n == DraftRecipe().num_layers

    ids = [1, 9690, 198, 19556, 314, 253, 1345, 30, 2]  # any ids
    # reference: the target's first n layers, its final norm and its tied head
    target = TrainLlama(cfg)
    target.load_hf(tstate)
    with torch.no_grad():
        x = target.model.embed_tokens(torch.tensor([ids]))
        pos = torch.arange(len(ids))[None]
        cos, sin = target.rope(pos, x.dtype)
        for layer in target.model.layers[:n]:
            x = layer(x, cos, sin, None, None, 0)
        ref = target.logits(target.model.norm(x))[0]

    eng = Engine.from_dir(out)
    got = eng.extend(eng.new_sequence(), ids)
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-4)

    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(hf_logits, ref, atol=1e-3, rtol=1e-4)


def test_generate_batch_deadline_truncates() -> None:
    import time

    m = tiny_llama()
    gens = generate_batch(m, [[5, 6], [7, 8, 9]], max_new_tokens=10, eos_ids=[-1], deadline=time.time())
    assert [len(g.tokens) for g in gens] == [1, 1]
