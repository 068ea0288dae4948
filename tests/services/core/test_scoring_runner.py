"""score_texts on tiny random-weight engines: one batched, chunked pass gives every text the
features of a plain whole-sequence forward, with and without an observer, and frees its KV."""

from __future__ import annotations

import torch
from tiny_models import tiny_config

from services.core.engine import Engine
from services.core.scoring.features import token_features
from services.core.scoring.runner import Text, score_texts

START = 0


def reference(engine: Engine, ids: list[int], observer: Engine | None = None):
    def logits(model: Engine) -> torch.Tensor:
        seq = model.new_sequence()
        try:
            return model.extend(seq, [START] + ids[:-1])
        finally:
            seq.release()

    return token_features(logits(engine), torch.tensor(ids), None if observer is None else logits(observer))


def test_batched_chunked_scoring_equals_plain_forward() -> None:
    engine = Engine.from_config(tiny_config(), seed=0, block_size=4)
    observer = Engine.from_config(tiny_config(num_hidden_layers=1), seed=1, block_size=4)
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (1, 9, 23, 256)]
    free = engine.pool.free_blocks, observer.pool.free_blocks
    got = score_texts(
        engine,
        [Text(ids, observer=i % 2 == 1) for i, ids in enumerate(texts)],
        START,
        observer,
        step_tokens=40,  # forces several pieces per text and a shrinking batch
        row_block=5,
    )
    assert (engine.pool.free_blocks, observer.pool.free_blocks) == free
    for i, (ids, f) in enumerate(zip(texts, got, strict=True)):
        want = reference(engine, ids, observer if i % 2 == 1 else None)
        assert f.logprob.shape == (len(ids),)
        for name in ("logprob", "rank", "entropy", "var", "kurtosis"):
            assert torch.allclose(getattr(f, name).float(), getattr(want, name).float(), atol=1e-4), name
        if i % 2:
            assert torch.allclose(f.cross_entropy, want.cross_entropy, atol=1e-4)
        else:
            assert f.cross_entropy is None
