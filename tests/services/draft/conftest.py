"""A router trained for real (SmolLM2 target, a slice draft), shared by the loader and training tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def served_draft(trained_router: TrainedRouter):
    """The slice draft's engine as the draft service prepares it."""
    from services.draft.training.router_labels import load_served_draft

    return load_served_draft(trained_router.draft_dir)
