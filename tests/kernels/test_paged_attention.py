"""Paged tree attention: the layout's mask rule, the reference, and the Triton kernel (run by
Triton's interpreter on CPU) against the reference on random batches of chains and trees."""

from __future__ import annotations

import math

import pytest
import torch

from bench.kernel_cases import random_case
from kernels.paged_attention import paged_attention, paged_attention_reference


def written_out(case) -> torch.Tensor:
    """Softmax attention per sequence and head with loops over the gathered key slots (float64)."""
    q, layout = case.q.double(), case.layout
    B, H, T, D = q.shape
    n_kv, bs = case.k_cache.shape[1], case.k_cache.shape[2]
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        slots = range(int(layout.key_len[b]))
        blocks = [int(layout.table[b, j // bs]) for j in slots]
        for h in range(H):
            kvh = h // (H // n_kv)
            k = torch.stack(
                [case.k_cache[blk, kvh, j % bs] for blk, j in zip(blocks, slots, strict=True)]
            ).double()
            v = torch.stack(
                [case.v_cache[blk, kvh, j % bs] for blk, j in zip(blocks, slots, strict=True)]
            ).double()
            scores = q[b, h] @ k.T / math.sqrt(D)  # [T, slots]
            scores = scores.masked_fill(~case.mask[b, 0, :, : len(slots)], float("-inf"))
            out[b, h] = scores.softmax(-1) @ v
    return out


@pytest.mark.parametrize("seed", range(0, 50, 5))
def test_layout_mask_and_reference_match_the_written_out_tree_attention(seed: int) -> None:
    case = random_case(seed)
    assert torch.equal(case.layout.dense_mask(), case.mask)
    ref = paged_attention_reference(case.q, case.k_cache, case.v_cache, case.layout)
    assert (ref.double() - written_out(case)).abs().max() <= 1e-5


def test_dispatch_runs_the_reference_on_cpu_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECMESH_KERNELS", raising=False)
    case = random_case(1)
    args = (case.q, case.k_cache, case.v_cache, case.layout)
    assert torch.equal(paged_attention(*args), paged_attention_reference(*args))


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


@pytest.mark.parametrize(
    ("dtype", "tolerance", "cases"),
    [(torch.float32, 1e-3, 50), (torch.bfloat16, 1e-2, 50), (torch.float16, 1e-2, 15)],
)
def test_triton_kernel_matches_the_reference_on_random_cases(
    dtype: torch.dtype, tolerance: float, cases: int
) -> None:
    pytest.importorskip("triton")
    from kernels.triton.paged_attention import paged_attention_triton

    errors = []
    for seed in range(cases):
        case = random_case(seed, dtype)
        # The reference in float32 from the same (rounded) inputs: the kernel accumulates in fp32.
        ref = paged_attention_reference(
            case.q.float(), case.k_cache.float(), case.v_cache.float(), case.layout
        )
        splits = 1 + seed % 3  # flash-decoding splits, merged by log-sum-exp, on a third of the cases each
        out = paged_attention_triton(case.q, case.k_cache, case.v_cache, case.layout, splits=splits)
        assert out.dtype == dtype and out.shape == case.q.shape
        errors.append(_relative_error(out, ref))
    assert max(errors) <= tolerance, (
        f"worst relative error {max(errors):.2e} (seed {errors.index(max(errors))})"
    )


def test_a_split_that_sees_no_key_is_weighted_zero() -> None:
    """More splits than key blocks for a short sequence: its empty splits must not add NaNs."""
    pytest.importorskip("triton")
    from kernels.triton.paged_attention import paged_attention_triton

    case = random_case(8)  # one sequence, 17 key slots
    ref = paged_attention_reference(case.q, case.k_cache, case.v_cache, case.layout)
    out = paged_attention_triton(case.q, case.k_cache, case.v_cache, case.layout, splits=4)
    assert torch.isfinite(out).all() and _relative_error(out, ref) <= 1e-3
