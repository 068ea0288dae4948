"""The published 4-bit weights (services.core.quant): read from the GGUF's own Q4_1 groups,
stored next to the fp32 weights, and served by the engine (`weights q4_1`) as the same weights.
The codes, scales and offsets must dequantize to exactly the fp32 import; the q4_1 engine's
logits are close to the fp32 engine's (bf16 activations at the products) and its greedy
output is reported against fp32 on real prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.core.engine import Engine
from services.core.errors import InvalidArgument
from services.core.loaders.gguf import read_gguf
from services.core.model_import import import_gguf
from services.core.quant import GROUP, Q4_FILE, Q4Groups, load_q4, q4_1_from_blocks, save_q4

Q4_NAMES = (
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.down_proj.weight",
)


def test_gguf_groups_dequantize_to_exactly_the_fp32_import(tiny_gguf) -> None:
    m = read_gguf(tiny_gguf().path, progress=False)
    expected = {f"model.layers.{i}.{n}" for i in range(2) for n in Q4_NAMES}  # the tiny file's Q4_1 tensors
    assert set(m.q4_1) == expected
    for name, groups in m.q4_1.items():
        assert groups.codes.dtype == torch.uint8 and int(groups.codes.max()) <= 15
        assert torch.equal(groups.dequantize(), m.state_dict[name]), name


def test_block_layout_low_nibble_first_then_high() -> None:
    """One group by hand: d = 0.5, m = -1, codes 0..15 then 15..0."""
    codes = list(range(16)) + list(range(15, -1, -1))
    block = torch.zeros(20, dtype=torch.uint8)
    block[0:2] = torch.tensor([0.5], dtype=torch.float16).view(torch.uint8)
    block[2:4] = torch.tensor([-1.0], dtype=torch.float16).view(torch.uint8)
    block[4:20] = torch.tensor([codes[j] | (codes[j + 16] << 4) for j in range(16)], dtype=torch.uint8)
    g = q4_1_from_blocks(block, 1, GROUP)
    assert g.codes[0].tolist() == codes
    assert g.dequantize()[0].tolist() == [0.5 * c - 1 for c in codes]
    with pytest.raises(InvalidArgument):
        q4_1_from_blocks(block, 2, GROUP)


def test_file_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    g = Q4Groups(
        torch.randint(0, 16, (6, 64), generator=gen, dtype=torch.uint8),
        torch.rand(6, 2, generator=gen).half(),
        torch.randn(6, 2, generator=gen).half(),
    )
    save_q4(tmp_path / Q4_FILE, {"w": g})
    back = load_q4(tmp_path / Q4_FILE)["w"]
    assert all(torch.equal(getattr(back, f), getattr(g, f)) for f in ("codes", "scale", "offset"))
    with pytest.raises(InvalidArgument, match="models import smollm2 --force"):
        load_q4(tmp_path / "absent" / Q4_FILE)


def test_tiny_engine_serves_its_q4_weights(tiny_gguf, tmp_path: Path) -> None:
    model_dir = import_gguf(tiny_gguf().path, "tiny", root=tmp_path, progress=False)
    assert (model_dir / Q4_FILE).is_file()
    fp32, q4 = Engine.from_dir(model_dir), Engine.from_dir(model_dir)
    # Per layer o and down; qkv (q, k are F32 in the tiny file) and gate_up (up is Q8_0) stay fp32.
    assert q4.use_q4_weights(model_dir) == 2 * 2
    assert q4.weights == "q4_1" and q4.pool.digest != fp32.pool.digest
    prompt = [5, 9, 11, 3, 7, 21, 8, 40]
    a, b = fp32.new_sequence(), q4.new_sequence()
    la, lb = fp32.prefill(a, prompt), q4.prefill(b, prompt)
    assert float((la - lb).abs().max()) <= 0.05 * float(la.abs().max())  # bf16 activations


@pytest.mark.slow
def test_smollm2_q4_weights_are_the_published_model(tmp_store_smollm2: Path) -> None:
    """The real import: all 120 projections switch to their Q4_1 groups (q/k through the rope
    row order too, which the exact-dequantization check at load covers); logits stay close to
    fp32's and the next-token argmax agrees at nearly every prompt position."""
    from services.core.tokenizer import Tokenizer

    fp32, q4 = Engine.from_dir(tmp_store_smollm2), Engine.from_dir(tmp_store_smollm2)
    assert q4.use_q4_weights(tmp_store_smollm2) == 4 * fp32.config.num_hidden_layers
    tok = Tokenizer.from_dir(tmp_store_smollm2)
    agree = total = 0
    worst = 0.0
    for text in ("What is the capital of France?", "def quicksort(xs):\n    # sort a list"):
        ids = tok.encode_chat([{"role": "user", "content": text}])
        la, lb = fp32.extend(fp32.new_sequence(), ids), q4.extend(q4.new_sequence(), ids)
        worst = max(worst, float((la - lb).abs().max()))
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        total += len(ids)
    print(f"q4_1 vs fp32: max |dlogit| {worst:.3f}, argmax agreement {agree}/{total}")
    assert worst <= 4.0 and agree >= 0.9 * total


def _decode_vs_verify(engine: Engine, prompts: list[list[int]], new: int = 40, chunk: int = 6):
    """Greedy-decode `new` tokens after each prompt one at a time, then verify the same tokens
    chunk by chunk as tree chains (as speculative decoding does) and accept them. Returns the
    largest |logit difference| between the two and how many argmax choices differ."""
    worst, flips = 0.0, 0
    for prompt in prompts:
        seq = engine.new_sequence()
        logits = engine.prefill(seq, prompt)
        greedy, decoded = [], []
        for _ in range(new):
            greedy.append(int(logits.argmax()))
            logits = engine.decode(seq, greedy[-1])
            decoded.append(logits)
        verified = engine.new_sequence()
        engine.prefill(verified, prompt)
        engine.decode(verified, greedy[0])
        for i in range(1, new - chunk + 1, chunk):
            tree, _ = engine.forward_tree(verified, greedy[i : i + chunk], [-1, *range(chunk - 1)])
            ref = torch.stack(decoded[i : i + chunk])
            worst = max(worst, float((tree - ref).abs().max()))
            flips += int((tree.argmax(-1) != ref.argmax(-1)).sum())
            engine.accept_path(verified, list(range(chunk)))
    return worst, flips


@pytest.mark.slow
def test_smollm2_q4_weights_verify_as_they_decode(tmp_store_smollm2: Path) -> None:
    """Losslessness per configuration: with the q4_1 weights, a verification forward of the
    target's greedy tokens gives the logits decoding them one at a time gave, so greedy
    speculative output equals target-only output. The negative control computes attention in
    fp32: the bf16 activations amplify its ulp-level differences between the two paths (on the
    Xeon up to 0.5 in a logit, flipping greedy tokens), which is why q4_1 attends in float64."""
    from services.core.tokenizer import Tokenizer

    q4 = Engine.from_dir(tmp_store_smollm2)
    assert q4.use_q4_weights(tmp_store_smollm2) > 0 and q4.attention_dtype == torch.float64
    q4.pack_weights()
    tok = Tokenizer.from_dir(tmp_store_smollm2)
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in (
        "Name three rivers in Europe and say where each one ends.",
        "Write a short note to a neighbour about a parcel.",
    )] + [tok.encode(t) for t in (
        "def merge(left, right):\n    \"\"\"Merge two sorted lists.\"\"\"\n",
        "import os\n\n\ndef walk_sizes(root):\n",
    )]  # fmt: skip
    worst, flips = _decode_vs_verify(q4, prompts)
    q4.attention_dtype = None  # the negative control: fp32 attention
    worst_fp32, flips_fp32 = _decode_vs_verify(q4, prompts)
    print(f"q4_1 decode vs verify: float64 attention {worst:.2e} ({flips} flips), ", end="")
    print(f"fp32 {worst_fp32:.2e} ({flips_fp32} flips)")
    assert flips == 0 and worst <= 1e-3
    assert worst_fp32 > 10 * worst
