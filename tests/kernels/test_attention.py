"""kernels.attention: the dispatch equals the model's previous SDPA call, and the reference
equals attention written out (softmax over masked scores, grouped KV heads)."""

import math

import pytest
import torch

from kernels.attention import attention, attention_reference


def inputs(B: int, H: int, Hkv: int, T: int, K: int, D: int, masked: bool):
    torch.manual_seed(B * 100 + T * 10 + K)
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, K, D), torch.randn(B, Hkv, K, D)
    mask = None
    if masked:  # causal over the last T keys, plus one hidden key to test masking itself
        mask = torch.ones(B, 1, T, K, dtype=torch.bool).tril(K - T)
        mask[:, :, -1, 0] = False  # the last query sees every key but this one
    return q, k, v, mask


def written_out(q, k, v, mask) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, T, K]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).float()


# (B, H, Hkv, T, K, D, masked): decode, a GQA verify, a batch, plain multi-head
CASES = [
    (1, 6, 2, 1, 9, 8, False),
    (1, 6, 2, 5, 12, 8, True),
    (3, 6, 3, 4, 7, 16, True),
    (2, 4, 4, 3, 3, 8, True),
]


@pytest.mark.parametrize("case", CASES)
def test_dispatch_is_the_previous_sdpa_call(case) -> None:
    q, k, v, mask = inputs(*case)
    old = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(attention(q, k, v, mask), old)


@pytest.mark.parametrize("case", CASES)
def test_reference_is_masked_softmax_attention(case) -> None:
    q, k, v, mask = inputs(*case)
    out = attention_reference(q, k, v, mask)
    assert out.shape == q.shape
    assert (out - written_out(q, k, v, mask)).abs().max() <= 1e-5


def test_float64_compute_gives_one_query_the_same_bits_alone_and_in_a_masked_batch() -> None:
    """compute_dtype=float64 (the q4_1 weights' attention): a query's output as a decode step
    (alone, no mask) equals its row in a masked multi-query forward whose extra keys it may not
    see, bit for bit, and the result comes back in q's dtype."""
    q, k, v, _ = inputs(1, 6, 2, 4, 20, 16, masked=False)
    mask = torch.ones(1, 1, 4, 24, dtype=torch.bool).tril(20)  # causal over 4 new keys at 20..23
    k_all = torch.cat([k, torch.randn(1, 2, 4, 16)], 2)
    v_all = torch.cat([v, torch.randn(1, 2, 4, 16)], 2)
    k_all[:, :, 20], v_all[:, :, 20] = k[:, :, 19] * 0.5, v[:, :, 19] * 0.5  # query 0's own key
    alone = attention(q[:, :, :1], k_all[:, :, :21], v_all[:, :, :21], None, torch.float64)
    batched = attention(q, k_all, v_all, mask, torch.float64)
    assert alone.dtype == torch.float32
    assert torch.equal(alone[:, :, 0], batched[:, :, 0])
    assert torch.equal(alone, written_out(q[:, :, :1], k_all[:, :, :21], v_all[:, :, :21], None))
