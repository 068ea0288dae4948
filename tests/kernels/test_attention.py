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
