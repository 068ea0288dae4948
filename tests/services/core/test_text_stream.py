"""Text release rules of generation: stop strings are cut (also across token boundaries),
incomplete UTF-8 is held back, and the released pieces add up to the decoded text."""

import pytest

from services.core.text_stream import TextReleaser
from services.core.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tok(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def release_all(tok: Tokenizer, text: str, stops: tuple[str, ...]) -> tuple[list[str], bool]:
    r = TextReleaser(tok, stops)
    pieces = []
    for t in tok.encode(text):
        out, stopped = r.push(t)
        pieces.append(out)
        if stopped:
            return pieces, True
    pieces.append(r.flush())
    return pieces, False


@pytest.mark.parametrize(
    "text",
    [
        "Plain English words.",
        "Ünïcödé ✓ and emoji 🎉🚀 mixed",
        "数字 12345 和 中文",
        "def f(x):\n    return x",
    ],
)
def test_pieces_add_up_to_decoded_text(tok: Tokenizer, text: str) -> None:
    pieces, stopped = release_all(tok, text, ())
    assert not stopped and "".join(pieces) == tok.decode(tok.encode(text))
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_cut_before_it(tok: Tokenizer) -> None:
    pieces, stopped = release_all(tok, "The answer is 42. END of story", ("END",))
    assert stopped and "".join(pieces) == "The answer is 42. "


def test_stop_string_spanning_tokens_is_never_partially_released(tok: Tokenizer) -> None:
    text = "alpha beta<|stop|>gamma"
    pieces, stopped = release_all(tok, text, ("a<|stop",))
    assert stopped and "".join(pieces) == "alpha bet"


def test_unmatched_held_back_tail_is_flushed(tok: Tokenizer) -> None:
    pieces, stopped = release_all(tok, "ends with EN", ("END",))
    assert not stopped and "".join(pieces) == "ends with EN"
