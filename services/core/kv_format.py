"""The bytes of one published KV block: a small typed header, then raw tensor bytes.

A sealed block (services.core.kv) holds, for each layer, K and V of `block_size` tokens:
k, v [layers, kv_heads, block_size, head_dim]. Published (services.runtime.kv_store) it becomes
one value, in the spirit of LMCache's chunk format:

    magic "SMKV" | version u16 | stored dtype u8 | computed dtype u8 | shape 4 x u32
    | key (32 bytes, the block's chained sha256) | digest length u16 | digest (utf-8)
    | K bytes | V bytes                                           (little-endian, no padding)

No pickle: a reader trusts nothing but the header's fixed layout and checks every field against
what it expects (the key it asked for, its own model digest, KV shape and dtype), so a value of
another model, layout or a truncated write parses as a miss, never as wrong KV.

Storage may be narrower than the computation (bf16 for fp32 KV: half the bytes, at the cost in
logits that the Redis tests report); the reader widens it back to the pool's dtype.
"""

from __future__ import annotations

import math
import struct
import warnings

import torch

MAGIC = b"SMKV"
VERSION = 1
_FIXED = struct.Struct("<4sHBB4I32sH")  # magic, version, stored, computed, shape, key, digest length

# dtype <-> the one-byte code in the header (codes are part of the format: never renumber)
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class BlockFormatError(ValueError):
    """A published block that cannot be this reader's block (the caller treats it as a miss)."""


def encode_block(
    k: torch.Tensor, v: torch.Tensor, *, key: bytes, digest: str, computed: torch.dtype | None = None
) -> bytes:
    """One block's value. k, v: [layers, kv_heads, block_size, head_dim] in the dtype to store;
    computed: the pool's dtype, when they were narrowed to store (k.to(bfloat16) of fp32 KV).

    Does no arithmetic on k and v (only reads their bytes), so it can run on a thread that must
    not start torch's parallel ops (see services.runtime.worker)."""
    if k.shape != v.shape or k.dim() != 4 or k.dtype != v.dtype:
        raise ValueError(
            f"k and v must be equal-shaped 4-d tensors, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if len(key) != 32:
        raise ValueError(f"a block key is 32 bytes (sha256), got {len(key)}")
    stored, computed = k.dtype, computed or k.dtype
    for dtype in (stored, computed):
        if dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported KV dtype {dtype}; supported: {sorted(map(str, DTYPE_CODES))}")
    name = digest.encode()
    header = _FIXED.pack(MAGIC, VERSION, DTYPE_CODES[stored], DTYPE_CODES[computed], *k.shape, key, len(name))
    return b"".join([header, name, _raw(k), _raw(v)])


def decode_block(
    data: bytes, *, key: bytes, digest: str, shape: tuple[int, int, int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) [layers, kv_heads, block_size, head_dim] in `dtype` from a value encode_block wrote
    for `key` under model `digest`; BlockFormatError when it is anything else."""
    if len(data) < _FIXED.size:
        raise BlockFormatError(f"truncated block: {len(data)} bytes, the header alone is {_FIXED.size}")
    magic, version, stored_code, computed_code, *rest = _FIXED.unpack_from(data)
    got_shape, got_key, name_len = tuple(rest[:4]), rest[4], rest[5]
    if magic != MAGIC:
        raise BlockFormatError(f"not a specmesh KV block (magic {magic!r})")
    if version != VERSION:
        raise BlockFormatError(f"block format version {version}, this reader knows {VERSION}")
    if got_key != key:
        raise BlockFormatError("block key in the header differs from the key it was stored under")
    stored = _CODE_DTYPES.get(stored_code)
    if stored is None:
        raise BlockFormatError(f"unknown stored dtype code {stored_code}")
    if _CODE_DTYPES.get(computed_code) != dtype:
        raise BlockFormatError(f"KV computed in dtype code {computed_code}, this pool holds {dtype}")
    if got_shape != tuple(shape):
        raise BlockFormatError(f"block shape {got_shape}, this pool's blocks are {tuple(shape)}")
    offset = _FIXED.size + name_len
    got_digest = data[_FIXED.size : offset].decode(errors="replace")
    if got_digest != digest:
        raise BlockFormatError(f"block of model digest {got_digest[:16]}..., this model is {digest[:16]}...")
    count = math.prod(shape)
    nbytes = count * stored.itemsize
    if len(data) != offset + 2 * nbytes:
        expected = offset + 2 * nbytes
        raise BlockFormatError(f"block of {len(data)} bytes, expected {expected} (truncated or padded)")
    with warnings.catch_warnings():
        # frombuffer warns that `bytes` is read-only; these views are only read (copied into the pool)
        warnings.simplefilter("ignore", UserWarning)
        k = torch.frombuffer(data, dtype=stored, count=count, offset=offset)
        v = torch.frombuffer(data, dtype=stored, count=count, offset=offset + nbytes)
    return k.view(shape).to(dtype), v.view(shape).to(dtype)


def block_nbytes(shape: tuple[int, int, int, int], dtype: torch.dtype, digest: str) -> int:
    """Size of one encoded block (header included)."""
    return _FIXED.size + len(digest.encode()) + 2 * math.prod(shape) * dtype.itemsize


def _raw(t: torch.Tensor) -> bytes:
    # bf16 has no numpy dtype: its bytes go through an int16 view of the same memory
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()
