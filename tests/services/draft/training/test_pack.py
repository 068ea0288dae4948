"""Data packs: the round trip, the refusals, the endless document stream, training from a pack, the CLI."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from services.core.errors import InvalidArgument, NotFound
from services.draft.training.checkpoint import REPORT_FILE
from services.draft.training.pack import build_pack, load_pack, pack_documents, tokenizer_sha256
from services.draft.training.train import train_draft

from .test_train import TINY_DOCS, TINY_PROMPTS, tiny_recipe, train_tiny

DOCS = ["alpha beta gamma " * 3, "x", "", "long document " * 40]
PROMPTS = ["What is a?", "How does b work?"]


def char_ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_round_trip_keeps_documents_prompts_and_meta(tmp_path: Path) -> None:
    out = tmp_path / "pack"  # no suffix: written exactly there
    meta = build_pack(
        out, DOCS, char_ids, PROMPTS, tokenizer_sha="abc", max_tokens=10_000, doc_max_tokens=100, seed=1
    )
    pack = load_pack(out, tokenizer_sha="abc")
    assert pack.prompts == PROMPTS and pack.meta == meta
    assert pack.num_documents == 3 and meta["documents"] == 3  # the empty document is skipped
    assert pack.document(0) == char_ids(DOCS[0]) and pack.document(1) == char_ids("x")
    window = "".join(map(chr, pack.document(2)))
    assert len(window) == 100 and window in DOCS[3]  # a contiguous window of the long document
    assert meta["tokens"] == len(DOCS[0]) + 1 + 100 and pack.tokens.dtype == np.uint16


def test_max_tokens_cuts_the_last_document(tmp_path: Path) -> None:
    meta = build_pack(tmp_path / "p.npz", DOCS, char_ids, [], tokenizer_sha="s", max_tokens=20)
    pack = load_pack(tmp_path / "p.npz")
    assert meta["tokens"] == 20 and pack.num_documents == 1 and len(pack.document(0)) == 20


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="positive"):
        build_pack(tmp_path / "a", DOCS, char_ids, [], tokenizer_sha="s", max_tokens=0)
    with pytest.raises(InvalidArgument, match="65535"):
        build_pack(tmp_path / "b", ["\U0001f600"], char_ids, [], tokenizer_sha="s", max_tokens=10)
    with pytest.raises(InvalidArgument, match="no documents"):
        build_pack(tmp_path / "c", [""], char_ids, [], tokenizer_sha="s", max_tokens=10)
    build_pack(tmp_path / "ok", DOCS, char_ids, [], tokenizer_sha="mine", max_tokens=50)
    with pytest.raises(InvalidArgument, match="another tokenizer") as e:
        load_pack(tmp_path / "ok", tokenizer_sha="theirs")
    assert e.value.field == "data"
    with pytest.raises(NotFound, match="does not exist"):
        load_pack(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidArgument, match="not a specmesh data pack"):
        load_pack(tmp_path / "junk.npz")


def test_pack_documents_cycles_through_every_document(tmp_path: Path) -> None:
    build_pack(tmp_path / "a", ["ab", "cd"], char_ids, [], tokenizer_sha="s", max_tokens=100)
    build_pack(tmp_path / "b", ["ef"], char_ids, [], tokenizer_sha="s", max_tokens=100)
    packs = [load_pack(tmp_path / "a"), load_pack(tmp_path / "b")]
    first_two_passes = list(itertools.islice(pack_documents(packs, seed=0), 6))
    expected = sorted([char_ids("ab"), char_ids("cd"), char_ids("ef")])
    assert sorted(first_two_passes[:3]) == expected and sorted(first_two_passes[3:]) == expected


def test_training_from_a_pack_uses_its_prompts_and_corpus(tiny_target: Path, tmp_path: Path) -> None:
    from services.core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_target)
    pack = tmp_path / "tiny.npz"
    sha = tokenizer_sha256(tiny_target)
    build_pack(pack, TINY_DOCS, tok.encode, TINY_PROMPTS, tokenizer_sha=sha, max_tokens=5000)
    # The same prompts twice: de-duplicated, none leaks into eval. Each step picks chat or corpus
    # at random (chat_frac 0.5), and how many random draws generation used first depends on
    # timing: 5 steps were all chat about 1 run in 32; with 30 steps that is 1 in 10^9.
    out = train_tiny(recipe=tiny_recipe(max_steps=30), data_packs=[pack, pack])
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["trained"] and report["data_packs"] == ["tiny.npz", "tiny.npz"]
    assert report["corpus_tokens"] > 0 and report["chat"]["answers"] > 0
    assert report["chat"]["prompts_available"] == len(TINY_PROMPTS) - tiny_recipe().n_eval


def test_training_refuses_a_pack_of_another_tokenizer(tiny_target: Path, tmp_path: Path) -> None:
    build_pack(tmp_path / "p.npz", DOCS, char_ids, PROMPTS, tokenizer_sha="other", max_tokens=100)
    with pytest.raises(InvalidArgument, match="another tokenizer"):
        train_draft(
            "tiny", "d", minutes=0.1, device="cpu", recipe=tiny_recipe(), data_packs=[tmp_path / "p.npz"]
        )


def test_cli_pack_writes_a_loadable_pack(tiny_target: Path, tmp_path: Path, capsys) -> None:
    from specmesh.cli import train

    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli.npz"
    args = parser.parse_args(["train", "pack", "--target", "tiny", "--out", str(out), "--tokens", "3000"])
    assert train.run_pack(args) == 0
    pack = load_pack(out, tokenizer_sha256(tiny_target))
    assert pack.meta["tokens"] == 3000 and len(pack.prompts) > 100
    assert "3000 tokens" in capsys.readouterr().out
