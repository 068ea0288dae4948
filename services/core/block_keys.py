"""Content addresses of full KV blocks: a chained sha256, as in vLLM's automatic prefix
caching and LMCache's chunk keys.

A block's KV depends on its own tokens and on every token before it, so its key hashes the
parent block's key together with the block's token ids: equal keys mean equal token prefixes
(up to sha256 collisions), and changing any earlier token changes every later key. The model
digest and the KV dtype are hashed into every block, so caches of different weights or
precisions never alias. The same keys name blocks in the in-process pool and, published,
in Redis.
"""

from __future__ import annotations

import hashlib

KEY_VERSION = b"specmesh-kv-block-v1"  # bump when the layout of the hashed bytes changes
ROOT_PARENT = bytes(32)  # the parent "key" of a sequence's first block


def block_key(digest: str, dtype: str, parent: bytes | None, token_ids: list[int]) -> bytes:
    """sha256 over (version, model digest, dtype, parent key, the block's token ids).

    parent: the previous block's key, None for a sequence's first block. Strings are
    NUL-terminated and token ids 4-byte little-endian, so no two inputs share their bytes.
    """
    if parent is not None and len(parent) != 32:
        raise ValueError(f"a parent key is 32 bytes (sha256), got {len(parent)}")
    h = hashlib.sha256(KEY_VERSION + b"\0" + digest.encode() + b"\0" + dtype.encode() + b"\0")
    h.update(ROOT_PARENT if parent is None else parent)
    h.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return h.digest()


def chain_keys(digest: str, dtype: str, token_ids: list[int], block_size: int) -> list[bytes]:
    """Keys of the full blocks of token_ids, in order (a trailing partial block has none)."""
    keys: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = keys[-1] if keys else None
        keys.append(block_key(digest, dtype, parent, token_ids[start : start + block_size]))
    return keys
