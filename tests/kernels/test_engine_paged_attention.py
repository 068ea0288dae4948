"""The engine through the Triton paged-attention kernel (SPECMESH_KERNELS=triton on Triton's
interpreter) gives the logits of the dense CPU path: a prefill, decode steps, a tree forward
and its accepted path, and a ragged batch of a chain and a tree."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config

from services.core.engine import Engine
from services.core.spec import ancestor_mask

pytest.importorskip("triton")

PROMPTS = ([5, 9, 11, 3, 7, 21, 8], [4, 4, 17, 30, 2, 6, 13, 13, 40, 1, 9])
TREE_TOKENS, TREE_PARENTS = [12, 14, 33, 7, 50], [-1, 0, 0, 1, -1]


def run(engine: Engine) -> list[torch.Tensor]:
    """Every logits tensor of one fixed script of engine calls."""
    out = []
    a, b = engine.new_sequence(), engine.new_sequence()
    out.append(engine.prefill(a, PROMPTS[0]))
    out.append(engine.prefill(b, PROMPTS[1]))
    for t in (3, 19, 25):  # decode steps, crossing a block boundary (block_size 4)
        out.append(engine.decode(a, t))
    logits, _ = engine.forward_tree(b, TREE_TOKENS, TREE_PARENTS)
    out.append(logits)
    engine.accept_path(b, [0, 1, 3])
    mask = ancestor_mask(TREE_PARENTS)
    batch, _ = engine.forward([a, b], [[8, 9, 10], TREE_TOKENS], tree_masks=[None, mask])
    out += batch
    return out


def test_paged_kernel_path_matches_the_dense_path(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine.from_config(tiny_config(), seed=4, block_size=4)
    monkeypatch.setenv("SPECMESH_KERNELS", "reference")
    dense = run(engine)
    monkeypatch.setenv("SPECMESH_KERNELS", "triton")
    import kernels.triton.paged_attention as triton_impl

    calls = []
    kernel = triton_impl.paged_attention_triton

    def counted(*args, **kw):
        calls.append(1)
        return kernel(*args, **kw)

    monkeypatch.setattr(triton_impl, "paged_attention_triton", counted)
    paged = run(engine)
    assert len(calls) == 7 * engine.config.num_hidden_layers  # every forward of the script, every layer
    assert len(paged) == len(dense)
    for x, y in zip(paged, dense, strict=True):
        assert x.shape == y.shape
        assert (x - y).abs().max() <= 1e-4 * y.abs().max()
