"""The published block format: exact round trips, bf16 storage, and every way a value that is
not this reader's block is refused (a miss, never wrong KV)."""

import pytest
import torch

from services.core.kv_format import BlockFormatError, block_nbytes, decode_block, encode_block

SHAPE = (3, 2, 4, 8)  # layers, kv_heads, block_size, head_dim
KEY = bytes(range(32))
DIGEST = "sha256-of-the-weights"


def kv(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g).to(dtype), torch.randn(SHAPE, generator=g).to(dtype)


def decode(data: bytes, **changes):
    args = dict(key=KEY, digest=DIGEST, shape=SHAPE, dtype=torch.float32) | changes
    return decode_block(data, **args)


def test_fp32_round_trip_is_bit_exact_and_sized_as_documented() -> None:
    k, v = kv()
    data = encode_block(k, v, key=KEY, digest=DIGEST)
    assert len(data) == block_nbytes(SHAPE, torch.float32, DIGEST)
    k2, v2 = decode(data)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    assert k2.dtype == torch.float32 and k2.shape == SHAPE


def test_bf16_storage_halves_the_payload_and_rounds_to_bf16() -> None:
    k, v = kv()
    data = encode_block(k.bfloat16(), v.bfloat16(), key=KEY, digest=DIGEST, computed=torch.float32)
    assert len(data) == block_nbytes(SHAPE, torch.bfloat16, DIGEST)
    k2, v2 = decode(data)
    assert k2.dtype == torch.float32  # widened back to the pool's dtype
    assert torch.equal(k2, k.to(torch.bfloat16).float()) and torch.equal(v2, v.to(torch.bfloat16).float())
    assert not torch.equal(k2, k)  # it did lose bits


def test_a_non_contiguous_pool_slice_encodes_its_values() -> None:
    pool = torch.randn(SHAPE[0], 5, *SHAPE[1:])  # [layers, blocks, heads, bs, D] as in BlockPool
    k = pool[:, 2]
    k2, _ = decode(encode_block(k, k, key=KEY, digest=DIGEST))
    assert torch.equal(k2, k)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"key": bytes(32)}, "block key"),
        ({"digest": "other-model"}, "model digest"),
        ({"shape": (3, 2, 8, 8)}, "block shape"),
        ({"dtype": torch.float16}, "computed in dtype"),
    ],
)
def test_a_block_of_something_else_is_refused(changes: dict, message: str) -> None:
    data = encode_block(*kv(), key=KEY, digest=DIGEST)
    with pytest.raises(BlockFormatError, match=message):
        decode(data, **changes)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: d[:10], "truncated block"),
        (lambda d: d[:-1], "expected"),
        (lambda d: d[: len(d) // 2], "expected"),
        (lambda d: d + b"x", "expected"),
        (lambda d: b"PKL!" + d[4:], "magic"),
        (lambda d: d[:4] + (99).to_bytes(2, "little") + d[6:], "version"),
        (lambda d: d[:6] + bytes([9]) + d[7:], "stored dtype"),
    ],
)
def test_truncated_or_corrupt_values_are_refused(corrupt, message: str) -> None:
    data = encode_block(*kv(), key=KEY, digest=DIGEST)
    with pytest.raises(BlockFormatError, match=message):
        decode(corrupt(data))


def test_encode_rejects_what_it_cannot_describe() -> None:
    k, v = kv()
    with pytest.raises(ValueError, match="32 bytes"):
        encode_block(k, v, key=b"short", digest=DIGEST)
    with pytest.raises(ValueError, match="equal-shaped"):
        encode_block(k, v[:1], key=KEY, digest=DIGEST)
    with pytest.raises(ValueError, match="unsupported"):
        encode_block(k.to(torch.int8), v.to(torch.int8), key=KEY, digest=DIGEST)
