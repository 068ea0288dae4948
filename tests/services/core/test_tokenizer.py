"""Tokenizer: round trips, HF parity, chat template, streaming detokenization, stop strings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.core.errors import InvalidArgument
from services.core.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop, partial_stop_len

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "  leading and trailing spaces  \n\n\ttabs\r\n",
    "Ünïcödé: naïve café, 日本語のテキスト, русский, العربية",
    "emoji 😀👍🏽🇫🇷 and ZWJ 👩‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def tiny_tok(tiny_vocab) -> Tokenizer:
    # Byte-level BPE with almost no merges: multi-byte characters span several tokens.
    from tokenizers import Tokenizer as HFTokenizer

    from services.core.loaders.gguf import build_tokenizer_json

    v = tiny_vocab
    hf = HFTokenizer.from_str(build_tokenizer_json(v["tokens"], v["types"], v["merges"], "smollm"))
    return Tokenizer(
        hf,
        chat_template=v["chat_template"],
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )


@pytest.fixture(scope="module")
def real_tok(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def test_import_does_not_pull_torch() -> None:
    code = (
        "import sys, services.core, services.core.tokenizer, services.core.model_store;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip_tiny(tiny_tok: Tokenizer, text: str) -> None:
    assert tiny_tok.decode(tiny_tok.encode(text), skip_special_tokens=False) == text


def test_special_tokens_and_ids(tiny_tok: Tokenizer) -> None:
    assert tiny_tok.eos_token_ids == (2,) and tiny_tok.bos_token_id == 1 and tiny_tok.pad_token_id == 2
    ids = tiny_tok.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tiny_tok.decode(ids) == "hi"
    with pytest.raises(InvalidArgument) as e:
        tiny_tok.decode([1, tiny_tok.vocab_size])
    assert e.value.field == "token_ids"
    with pytest.raises(InvalidArgument):
        tiny_tok.decode([-1])


def test_chat_template_tiny(tiny_tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert tiny_tok.apply_chat_template(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("<|im_end|>\n")
    assert tiny_tok.encode_chat(msgs)[:1] == [1]


def test_chat_template_errors() -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    check = "{{ raise_exception('first message must be user') }}"
    template = "{% if messages[0]['role'] != 'user' %}" + check + "{% endif %}x"
    tok = Tokenizer(HFTokenizer(BPE()), chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "x"
    with pytest.raises(InvalidArgument, match="first message must be user") as e:
        tok.apply_chat_template([{"role": "system", "content": "a"}])
    assert e.value.field == "messages"
    for bad in ([], [{"content": "no role"}], "text"):
        with pytest.raises(InvalidArgument):
            tok.apply_chat_template(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="no chat template"):
        Tokenizer(HFTokenizer(BPE())).apply_chat_template([{"role": "user", "content": "a"}])


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    return [det.feed(i) for i in ids] + [det.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_tiny(tiny_tok: Tokenizer, text: str) -> None:
    ids = tiny_tok.encode(text)
    deltas = _stream(tiny_tok, ids)
    assert "".join(deltas) == tiny_tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)  # never emits half a character
    assert "".join(_stream(tiny_tok, ids, skip=False)) == tiny_tok.decode(ids, skip_special_tokens=False)


def test_incremental_detokenizer_holds_partial_utf8(tiny_tok: Tokenizer) -> None:
    ids = tiny_tok.encode("😀")  # 4 bytes -> 4 byte-level tokens in the tiny vocab
    assert len(ids) == 4
    det = IncrementalDetokenizer(tiny_tok)
    assert [det.feed(i) for i in ids] == ["", "", "", "😀"]
    det.feed_many(tiny_tok.encode("é")[:1])
    assert det.flush() == "\ufffd"  # an unfinished character only surfaces on flush


def test_find_stop() -> None:
    assert find_stop("hello world", ["wor"]) == 6
    assert find_stop("hello world", ["xyz"]) is None
    assert find_stop("a STOP b END", ["END", "STOP"]) == 2  # earliest wins, not first listed
    assert find_stop("abc\n\nUser:", ["\n\n", "User:"]) == 3
    # Streaming: only search new text, but catch a stop string straddling the boundary.
    assert find_stop("xxxxST" + "OPyy", ["STOP"], start=6) == 4
    assert find_stop("STOP....new", ["STOP"], start=8) is None
    assert find_stop("", ["a"]) is None
    with pytest.raises(InvalidArgument):
        find_stop("abc", [""])


def test_partial_stop_len() -> None:
    assert partial_stop_len("hello wo", ["world"]) == 2
    assert partial_stop_len("hello", ["world"]) == 0
    assert partial_stop_len("ab<|im", ["<|im_end|>", "b<"]) == 4
    assert partial_stop_len("abc", ["abc"]) == 0  # a full match is find_stop's job


# --- real SmolLM2 tokenizer ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip_real(real_tok: Tokenizer, text: str) -> None:
    ids = real_tok.encode(text)
    assert real_tok.decode(ids, skip_special_tokens=False) == text
    deltas = _stream(real_tok, ids, skip=False)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


@pytest.mark.slow
def test_real_ids_match_transformers(real_tok: Tokenizer, smollm2_dir) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    for text in TEXTS:
        assert real_tok.encode(text) == hf.encode(text, add_special_tokens=False), text
        ids = real_tok.encode(text)
        assert real_tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? 😀"}]
    hf_ids = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert real_tok.encode_chat(msgs) == list(hf_ids)
    assert real_tok.apply_chat_template(msgs) == hf.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    )
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        real_tok.bos_token_id,
        real_tok.eos_token_ids[0],
        real_tok.pad_token_id,
    )


@pytest.mark.slow
def test_real_chat_template(real_tok: Tokenizer) -> None:
    prompt = real_tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")  # SmolLM2 injects its default system prompt
    assert real_tok.eos_token_ids == (2,) and real_tok.vocab_size == 49152
    ids = real_tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == real_tok.bos_token_id and ids.count(real_tok.eos_token_ids[0]) == 2


@pytest.mark.slow
def test_real_incremental_emoji(real_tok: Tokenizer) -> None:
    text = "Sure! 🎉🎉 Ünïcödé → 日本 🇯🇵 done."
    ids = real_tok.encode(text)
    deltas = _stream(real_tok, ids)
    assert "".join(deltas) == real_tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_from_json_matches_from_dir_on_the_real_model(smollm2_dir) -> None:
    """The wire form a target serves (encode_sources -> decode_sources) rebuilds the same tokenizer."""
    from services.core.tokenizer import decode_sources, encode_sources, read_tokenizer_sources

    a = Tokenizer.from_dir(smollm2_dir)
    b = Tokenizer.from_json(*read_tokenizer_sources(smollm2_dir))
    c = decode_sources(*encode_sources(a))
    texts = [
        "Hello, world!",
        "naïve café — 日本語 🙂",
        "  spaces\n\ttabs  ",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    for t in (b, c):
        assert t.vocab_size == a.vocab_size
        assert t.eos_token_ids == a.eos_token_ids and t.bos_token_id == a.bos_token_id
        assert t.model_max_length == a.model_max_length and t.chat_template == a.chat_template
        for text in texts:
            ids = a.encode(text)
            assert t.encode(text) == ids and t.decode(ids) == a.decode(ids)
        assert t.apply_chat_template(messages) == a.apply_chat_template(messages)
        assert t.encode_chat(messages) == a.encode_chat(messages)
    assert a.chat_template and a.eos_token_ids


def test_decode_sources_refuses_a_wrong_digest(smollm2_dir) -> None:
    from services.core.errors import InvalidArgument
    from services.core.tokenizer import decode_sources, encode_sources

    tj, cj, digest = encode_sources(Tokenizer.from_dir(smollm2_dir))
    with pytest.raises(InvalidArgument, match="sha256"):
        decode_sources(tj, cj + b" ", digest)
