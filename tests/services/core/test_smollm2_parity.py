"""Real-weights parity on SmolLM2-135M-Instruct (fp32).

- Full-forward logits of our engine vs transformers' LlamaForCausalLM loaded from the same
  model directory: max |delta logit| <= 1e-3 on varied prompts.
- KV equivalence: incremental decode, chunked prefill and the tree-masked forward give the
  logits of one full causal forward (<= 1e-4). The reference forward runs in float64: it is the
  value every fp32 path approximates, and an fp32 full forward is itself up to ~9e-5 away from
  it, so two fp32 paths can differ by more than either differs from the exact result.

Each test prints the measured maximum (run with -s to see it).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

HF_TOL = 1e-3
KV_TOL = 1e-4

LONG_TEXT = (
    "The history of computing is a story of abstraction layered on abstraction. Early machines were "
    "programmed by rewiring panels; then came stored programs, assemblers, compilers and operating "
    "systems, each hiding the details of the layer below. In 1945 John von Neumann described a design "
    "in which instructions and data share one memory, and nearly every computer since has followed it. "
    "Transistors replaced vacuum tubes in the late 1950s, integrated circuits put many transistors on a "
    "single chip, and by 1971 a whole processor fit on one die. Moore observed that the number of "
    "transistors per chip doubled roughly every two years, a trend that held for decades and drove "
    "costs down by many orders of magnitude. Software grew alongside: time-sharing systems let dozens "
    "of people use one machine at once, UNIX introduced small tools joined by pipes, and the C language "
    "made it portable. Personal computers brought computing into homes in the 1980s, graphical "
    "interfaces made it approachable, and the World Wide Web, proposed in 1989, connected it all. "
    "Today a phone in a pocket holds more computing power than the machines that guided the Apollo "
    "missions, and networks of data centres train models with billions of parameters on text gathered "
    "from across the internet. Yet the basic ideas remain: represent information as bits, transform "
    "it with simple operations, and build complexity by composing small, well-understood parts into "
    "larger ones, one careful layer at a time, with tests at every step."
)

PROMPTS: dict[str, str | list[dict[str, str]]] = {
    "chat": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Give me three tips for sleeping better."},
    ],
    "code": "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot, *rest = xs\n    return ",
    "digits": "3.14159265358979 + 2.718281828 = 5.859874482; 0x1F = 31; 2024-11-27T06:00:00Z; 1,234,567.89",
    "unicode": "Grüße aus München! 東京は今日も晴れです。Ελληνικά, русский, עברית — café naïve 🚀🔥✓",
    "long": LONG_TEXT,
    "single": "Hello",
    "whitespace": "line one\n\n\tindented with a tab\n        eight spaces   and\ttabs\r\n}\n",
    "english": "The quick brown fox jumps over the lazy dog while the cat watches from the windowsill.",
}


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    from services.core.engine import Engine

    return Engine.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def packed_engine(smollm2_dir):
    """The serving configuration: oneDNN-packed weights for 3-16-row forwards."""
    from services.core.engine import Engine

    eng = Engine.from_dir(smollm2_dir)
    if not eng.pack_weights():
        pytest.skip("oneDNN is not available: no packed weights")
    return eng


@pytest.fixture(scope="module")
def exact(smollm2_dir):
    """The same weights in float64: the reference of the KV-equivalence tests."""
    from services.core.engine import Engine

    return Engine.from_dir(smollm2_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from services.core.tokenizer import Tokenizer

    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    return transformers.LlamaForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def prompt_ids(tokenizer, name: str) -> list[int]:
    p = PROMPTS[name]
    ids = tokenizer.encode_chat(p) if isinstance(p, list) else tokenizer.encode(p)
    if name == "single":
        ids = ids[:1]
    if name == "long":
        ids = ids[:300]
    return ids


def full_logits(engine, ids: list[int]) -> torch.Tensor:
    seq = engine.new_sequence()
    try:
        return engine.extend(seq, ids)
    finally:
        seq.release()


def test_prompt_shapes(tokenizer) -> None:
    assert len(prompt_ids(tokenizer, "single")) == 1
    assert 280 <= len(prompt_ids(tokenizer, "long")) <= 300
    assert len(prompt_ids(tokenizer, "chat")) > 20


@pytest.mark.parametrize("name", list(PROMPTS))
def test_full_forward_matches_transformers(engine, tokenizer, hf_model, name: str) -> None:
    ids = prompt_ids(tokenizer, name)
    ours = full_logits(engine, ids)
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape == (len(ids), engine.config.vocab_size)
    err = (ours - ref).abs().max().item()
    print(f"\n[smollm2 parity] {name}: {len(ids)} tokens, max |delta logit| = {err:.3e}")
    assert err <= HF_TOL
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def kv_ids(tokenizer) -> list[int]:
    """~150 tokens: chat prompt, code and digits, crossing several 16-token blocks."""
    return prompt_ids(tokenizer, "chat") + prompt_ids(tokenizer, "code") + prompt_ids(tokenizer, "digits")


def test_incremental_decode_matches_full_forward(engine, exact, tokenizer) -> None:
    ids = kv_ids(tokenizer)
    ref = full_logits(exact, ids).float()
    seq = engine.new_sequence()
    try:
        first = engine.extend(seq, ids[:5])
        steps = [engine.decode(seq, t) for t in ids[5:]]
    finally:
        seq.release()
    got = torch.cat([first, torch.stack(steps)])
    err = (got - ref).abs().max().item()
    print(f"\n[smollm2 kv] incremental decode over {len(ids)} tokens: max |delta| = {err:.3e}")
    assert err <= KV_TOL


def test_chunked_prefill_matches_full_forward(engine, exact, tokenizer) -> None:
    ids = kv_ids(tokenizer)
    ref = full_logits(exact, ids).float()
    cuts = [0, 3, 16, 17, 40, 64, len(ids)]
    seq = engine.new_sequence()
    try:
        got = torch.cat([engine.extend(seq, ids[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)])
    finally:
        seq.release()
    err = (got - ref).abs().max().item()
    print(f"\n[smollm2 kv] chunked prefill {cuts}: max |delta| = {err:.3e}")
    assert err <= KV_TOL


@pytest.mark.parametrize("weights", ["blas", "packed"])
def test_tree_forward_matches_full_forward(weights, request, exact, tokenizer) -> None:
    engine = request.getfixturevalue("engine" if weights == "blas" else "packed_engine")
    prefix = prompt_ids(tokenizer, "chat")
    #          0   1  2  3  4  5  6  7  8
    parents = [-1, -1, 0, 0, 1, 2, 5, 3, 7]
    tokens = tokenizer.encode(" Sure! Here are three quick tips for better sleep tonight")[: len(parents)]
    assert len(tokens) == len(parents)
    seq = engine.new_sequence()
    try:
        engine.extend(seq, prefix)
        tree, _ = engine.forward_tree(seq, tokens, parents)
    finally:
        seq.release()
    worst = 0.0
    for node in range(len(parents)):
        path, i = [], node
        while i >= 0:
            path.append(i)
            i = parents[i]
        ref = full_logits(exact, prefix + [tokens[j] for j in reversed(path)])[-1].float()
        worst = max(worst, (tree[node] - ref).abs().max().item())
    print(f"\n[smollm2 kv] tree forward ({len(parents)} nodes, {weights}): max |delta| = {worst:.3e}")
    assert worst <= KV_TOL
