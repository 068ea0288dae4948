"""The membership reference model: documents never straddle the two sides, and the fine-tune
lowers the loss on the members it trained on more than on the held-out non-members."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.core.tokenizer import Tokenizer
from services.draft.training.membership import (
    MEMBERS_FILE,
    NONMEMBERS_FILE,
    MembershipRecipe,
    cut_text,
    split_members,
    train_membership_model,
)
from services.scoring.convert import start_token_id

# real sentences (the held-out chat prompts the benchmarks use), not text written for the test
PROMPTS = "bench/prompts/chat.jsonl"


def test_a_document_goes_to_one_side() -> None:
    texts = [(f"doc{d}", f"paragraph {p} of document {d}") for d in range(40) for p in range(3)]
    members, nonmembers = split_members(texts, n=1000, seed=1)
    side = {t: "m" for t in members} | {t: "n" for t in nonmembers}
    assert len(side) == len(texts) and members and nonmembers
    for d in range(40):
        assert len({side[f"paragraph {p} of document {d}"] for p in range(3)}) == 1
    assert split_members(texts, n=1000, seed=1) == (members, nonmembers)  # seeded
    assert split_members(texts, n=5, seed=1) == (members[:5], nonmembers[:5])


@pytest.fixture(scope="module")
def tiny_dir(tiny_gguf, tmp_path_factory):
    from services.core import model_import as mi

    root = tmp_path_factory.mktemp("membership")
    return mi.import_gguf(tiny_gguf().path, "tiny", root=root, progress=False)


def test_the_fine_tune_separates_members(tiny_dir, tmp_path) -> None:
    tokenizer = Tokenizer.from_dir(tiny_dir)
    lines = [json.loads(line)["prompt"] for line in Path(PROMPTS).read_text().splitlines()][:16]
    texts = [cut_text(tokenizer, t, 24) for t in lines]
    assert all(len(tokenizer.encode(t)) <= 24 for t in texts)
    recipe = MembershipRecipe(epochs=12, lr=3e-3, batch=4, max_tokens=24)
    out = train_membership_model(
        tiny_dir,
        texts[:8],
        texts[8:],
        tmp_path / "m",
        start_token_id(tokenizer),
        recipe,
        log=print,
        progress=False,
    )
    report = json.loads((out / "train_report.json").read_text())
    before, after = report["loss_before"], report["loss_after"]
    # the members' loss falls far below where it started and below the non-members'
    assert after["members"] < before["members"] - 1.0
    assert after["members"] < after["nonmembers"] - 0.5
    saved = [json.loads(line)["text"] for line in (out / MEMBERS_FILE).read_text().splitlines()]
    assert saved == texts[:8] and len((out / NONMEMBERS_FILE).read_text().splitlines()) == 8
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert {MEMBERS_FILE, NONMEMBERS_FILE, "model.safetensors"} <= set(manifest)
