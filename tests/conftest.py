"""Shared fixtures.

- `smollm2_dir`: the real default model in the user's model root, imported once and
  cached across runs (slow only the first time).
- `tmp_model_root`: an empty store root with SPECMESH_MODEL_DIR pointed at it.
- `tmp_store_smollm2`: a real SmolLM2 import into a throwaway root, built lazily, once per session.
- `tiny_gguf`: a factory writing small synthetic llama GGUF files (fast tests of the loaders
  and the store without the real weights).
- `tiny_image_dir`: image models trained by the real recipe at tiny sizes (tests/services/image,
  the gateway's image front door).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# --- real model ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from services.core.model_import import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture
def tmp_model_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "models"
    monkeypatch.setenv("SPECMESH_MODEL_DIR", str(root))
    return root


@pytest.fixture(scope="session")
def tmp_store_smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.core.model_import import import_smollm2

    return import_smollm2(root=tmp_path_factory.mktemp("store"), progress=False)


# --- tiny synthetic GGUF -------------------------------------------------------------------------

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ i", "Ġ in", "e r", "o n", "Ġ w"]
TINY_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """Specials + the 256 byte-level symbols + one token per merge: a complete byte-level BPE."""
    from tokenizers import pre_tokenizers

    tokens = TINY_SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += [m.replace(" ", "") for m in TINY_MERGES]
    types = [3] * len(TINY_SPECIALS) + [1] * (len(tokens) - len(TINY_SPECIALS))
    return tokens, types, list(TINY_MERGES)


def _llamacpp_interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reference of the converter's q/k row order, written as an explicit loop.

    HF pairs dimension j with j + head_dim/2 (rotate_half); llama.cpp wants each pair in
    adjacent rows 2j, 2j+1.
    """
    out = np.empty_like(w)
    hd = w.shape[0] // n_head
    for h in range(n_head):
        for j in range(hd // 2):
            for a in range(2):
                out[h * hd + 2 * j + a] = w[h * hd + a * (hd // 2) + j]
    return out


@pytest.fixture(scope="session")
def tiny_vocab() -> dict[str, Any]:
    """tokens / types / merges / chat_template of the tiny byte-level BPE used by `tiny_gguf`."""
    tokens, types, merges = _tiny_vocab()
    return {"tokens": tokens, "types": types, "merges": merges, "chat_template": TINY_TEMPLATE}


@pytest.fixture(scope="session")
def llamacpp_interleave() -> Callable[[np.ndarray, int], np.ndarray]:
    """The loop reference of llama.cpp's q/k row order (see `_llamacpp_interleave`)."""
    return _llamacpp_interleave


@dataclass
class TinyGGUF:
    path: Path
    # Expected fp32 HF-named weights after reading (quantized ones as dequantize(quantize(w))).
    state_dict: dict[str, np.ndarray]
    n_layers: int = 2
    hidden: int = 64
    n_head: int = 4
    n_kv: int = 2
    ffn: int = 128


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., TinyGGUF]:
    """Factory: tiny_gguf(arch="llama", skip_keys=(), skip_tensors=(), untied=False) -> TinyGGUF."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    counter = iter(range(10**6))

    def make(
        arch: str = "llama",
        skip_keys: tuple[str, ...] = (),
        skip_tensors: tuple[str, ...] = (),
        untied: bool = False,
    ) -> TinyGGUF:
        t = TinyGGUF(path=tmp_path_factory.mktemp("gguf") / f"tiny{next(counter)}.gguf", state_dict={})
        rng = np.random.default_rng(0)
        tokens, types, merges = _tiny_vocab()
        hd = t.hidden // t.n_head
        w = gguf.GGUFWriter(str(t.path), arch)
        kv: dict[str, tuple[str, Any]] = {
            f"{arch}.block_count": ("uint32", t.n_layers),
            f"{arch}.context_length": ("uint32", 256),
            f"{arch}.embedding_length": ("uint32", t.hidden),
            f"{arch}.feed_forward_length": ("uint32", t.ffn),
            f"{arch}.attention.head_count": ("uint32", t.n_head),
            f"{arch}.attention.head_count_kv": ("uint32", t.n_kv),
            f"{arch}.rope.freq_base": ("float32", 10000.0),
            f"{arch}.attention.layer_norm_rms_epsilon": ("float32", 1e-5),
            f"{arch}.vocab_size": ("uint32", len(tokens)),
            "general.name": ("string", "tiny"),
            "general.license": ("string", "apache-2.0"),
            "tokenizer.ggml.model": ("string", "gpt2"),
            "tokenizer.ggml.pre": ("string", "smollm"),
            "tokenizer.ggml.tokens": ("array", tokens),
            "tokenizer.ggml.token_type": ("array", types),
            "tokenizer.ggml.merges": ("array", merges),
            "tokenizer.ggml.bos_token_id": ("uint32", 1),
            "tokenizer.ggml.eos_token_id": ("uint32", 2),
            "tokenizer.ggml.unknown_token_id": ("uint32", 0),
            "tokenizer.ggml.padding_token_id": ("uint32", 2),
            "tokenizer.ggml.add_bos_token": ("bool", False),
            "tokenizer.chat_template": ("string", TINY_TEMPLATE),
        }
        for key, (kind, val) in kv.items():
            if key not in skip_keys:
                getattr(w, f"add_{kind}")(key, val)

        def add(gguf_name: str, hf_name: str, arr: np.ndarray, qtype: Q = Q.F32, n_rope: int = 0) -> None:
            arr = arr.astype(np.float32)
            if qtype == Q.F32:
                t.state_dict[hf_name] = arr
                stored = _llamacpp_interleave(arr, n_rope) if n_rope else arr
                data = stored
            else:  # quantized tensors are never q/k here, so no permutation to account for
                data = quantize(arr, qtype)
                t.state_dict[hf_name] = dequantize(data, qtype).reshape(arr.shape)
            if gguf_name not in skip_tensors:
                w.add_tensor(gguf_name, data, raw_dtype=None if qtype == Q.F32 else qtype)

        v = len(tokens)
        add("token_embd.weight", "model.embed_tokens.weight", rng.standard_normal((v, t.hidden)), Q.Q8_0)
        add("output_norm.weight", "model.norm.weight", 1 + 0.1 * rng.standard_normal(t.hidden))
        if untied:
            add("output.weight", "lm_head.weight", rng.standard_normal((v, t.hidden)), Q.Q8_0)
        for i in range(t.n_layers):
            p, hp = f"blk.{i}.", f"model.layers.{i}."
            norms = [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]
            for g, h in norms:
                add(f"{p}{g}.weight", f"{hp}{h}.weight", 1 + 0.1 * rng.standard_normal(t.hidden))
            # q/k stay F32 so the permutation is checked exactly; the rest go through quantization.
            for g, h, rows in [("attn_q", "q_proj", t.n_head), ("attn_k", "k_proj", t.n_kv)]:
                w_qk = rng.standard_normal((rows * hd, t.hidden))
                add(f"{p}{g}.weight", f"{hp}self_attn.{h}.weight", w_qk, n_rope=rows)
            quantized = [
                ("attn_v", "self_attn.v_proj", (t.n_kv * hd, t.hidden), Q.Q4_1),
                ("attn_output", "self_attn.o_proj", (t.hidden, t.hidden), Q.Q4_1),
                ("ffn_gate", "mlp.gate_proj", (t.ffn, t.hidden), Q.Q4_1),
                ("ffn_up", "mlp.up_proj", (t.ffn, t.hidden), Q.Q8_0),
                ("ffn_down", "mlp.down_proj", (t.hidden, t.ffn), Q.Q4_1),
            ]
            for g, h, shape, qt in quantized:
                add(f"{p}{g}.weight", f"{hp}{h}.weight", rng.standard_normal(shape), qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return t

    return make


@pytest.fixture(scope="session")
def draft_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 4-layer slice of the target (about a second to build): losslessness must
    hold for any draft, and a weak one exercises rejections and residual sampling."""
    from services.draft.training.train import train_draft

    root = tmp_path_factory.mktemp("drafts")
    return train_draft(
        smollm2_dir, "slice-draft", untrained=True, root=root, progress=False, log=lambda _: None
    )


@pytest.fixture
def redis_server():
    """A real Valkey / Redis server on a free loopback port (see tests/redis_server.py)."""
    from redis_server import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.kill()


# --- a token router trained for real (tests/services/draft, tests/integration/test_r2r_smollm2.py) ---

TINY_PROMPTS = ["What does `ls` do?", "How do I read a file in Python?", "What is a pipe?", "Explain grep."]
TINY_DOCS = [
    'def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n\n' * 6,
    "The cat utility reads files sequentially, writing them to the standard output. " * 8,
]


@dataclass
class TrainedRouter:
    draft_dir: Path
    router_dir: Path
    config: dict


@pytest.fixture(scope="session")
def trained_router(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRouter:
    """A 1-epoch router over 4 short answers and 2 corpus windows (about 10 s): real weights, a
    4-layer slice draft with a 4096-token draft vocabulary, so features come from a truncated head."""
    from services.core.model_store import DRAFT_VOCAB_FILE, write_manifest
    from services.draft.training.router import RouterRecipe, train_router
    from services.draft.training.train import train_draft

    root = tmp_path_factory.mktemp("router-store")
    draft_dir = train_draft(
        smollm2_dir, "router-draft", untrained=True, root=root, progress=False, log=lambda _: None
    )
    (draft_dir / DRAFT_VOCAB_FILE).write_text(json.dumps({"token_ids": list(range(4096))}))
    write_manifest(draft_dir)
    recipe = RouterRecipe(
        prompts=4,
        documents=2,
        holdout=0.5,
        answer_tokens=8,
        seq_len=40,
        context=8,
        window=3,
        epochs=1,
        gen_batch=4,
    )
    out = train_router(
        draft_dir,
        smollm2_dir,
        recipe=recipe,
        progress=False,
        prompts=TINY_PROMPTS,
        documents=iter(TINY_DOCS),
        log=lambda _: None,
    )
    return TrainedRouter(draft_dir, out, json.loads((out / "router.json").read_text()))


# --- tiny image models (tests/services/image, tests/gateway/test_image_front_door.py) -----------

# Run in a fresh process at one OpenMP thread: inside a pytest process whose torch already ran
# multi-threaded ops, the same few hundred small convolutions and backward passes measured 4-15x
# slower (6 s alone, 28-106 s in-process on a loaded 2-core machine).
TRAIN_TINY_IMAGE = """
import sys
from pathlib import Path
from services.image.training.recipe import ImageRecipe
from services.image.training.train import train_image

recipe = ImageRecipe(
    vq_steps=20, judge_steps=20, ar_steps=20, draft_steps=20, batch=16, codebook_size=32,
    vq_channels=8, target_hidden=64, target_layers=2, draft_hidden=32, draft_layers=1,
)
train_image(Path(sys.argv[1]), recipe, progress=False, log=lambda _: None)
"""


@pytest.fixture(scope="session")
def tiny_image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny image model directory trained once per session by the real recipe (seconds: few
    steps, small sizes). Tests check mechanics with it, not image quality (the benchmark does)."""
    out = tmp_path_factory.mktemp("image") / "tiny-image"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-c", TRAIN_TINY_IMAGE, str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=repo, timeout=600)
    return out
