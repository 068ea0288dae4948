"""H2O statistics: the accumulation reference is the written-out column sum, the Triton kernel
(Triton's interpreter) matches it on random shapes. The keep-set policy is tested with
services.core.h2o."""

from __future__ import annotations

import pytest
import torch

from kernels.h2o import h2o_accumulate, h2o_accumulate_reference


def attention_weights(B: int, H: int, T: int, K: int, gen: torch.Generator, dtype=torch.float32):
    return torch.randn(B, H, T, K, generator=gen).softmax(-1).to(dtype)


def test_reference_is_the_column_sum_per_kv_head() -> None:
    gen = torch.Generator().manual_seed(0)
    attn = attention_weights(2, 6, 3, 11, gen)
    scores = torch.rand(2, 2, 11, generator=gen)
    expected = scores.clone()
    for b in range(2):
        for h in range(6):
            expected[b, h // 3] += attn[b, h].sum(0)
    assert torch.allclose(h2o_accumulate_reference(scores.clone(), attn), expected, atol=1e-6)
    assert torch.equal(h2o_accumulate(scores.clone(), attn), h2o_accumulate_reference(scores.clone(), attn))


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_triton_accumulation_matches_the_reference(dtype: torch.dtype, tolerance: float) -> None:
    pytest.importorskip("triton")
    from kernels.triton.h2o import h2o_accumulate_triton

    gen = torch.Generator().manual_seed(1)
    for case in range(50):
        B, n_kv, G = 1 + case % 2, 1 + case % 3, (1, 2, 4)[case % 3]
        T, K = (1, 5, 17)[case % 3], int(torch.randint(1, 300, (1,), generator=gen))
        attn = attention_weights(B, n_kv * G, T, K, gen, dtype)
        start = torch.rand(B, n_kv, K, generator=gen)
        ref = h2o_accumulate_reference(start.clone(), attn)
        out = h2o_accumulate_triton(start.clone(), attn)
        assert float((out - ref).abs().max() / ref.abs().max()) <= tolerance, case
