"""Chained content addresses of KV blocks: what changes a key and what does not."""

import hashlib

import pytest

from services.core.block_keys import block_key, chain_keys

DIGEST, DTYPE, BS = "abc123", "float32", 4
IDS = list(range(100, 114))  # three full blocks and a partial one


def test_key_is_sha256_of_the_documented_layout() -> None:
    parent = bytes(range(32))
    expected = hashlib.sha256(
        b"specmesh-kv-block-v1\0abc123\0float32\0"
        + parent
        + b"".join(t.to_bytes(4, "little") for t in [1, 2, 70000])
    ).digest()
    assert block_key(DIGEST, DTYPE, parent, [1, 2, 70000]) == expected
    assert block_key(DIGEST, DTYPE, None, [1]) == block_key(DIGEST, DTYPE, bytes(32), [1])


def test_chain_has_one_key_per_full_block_and_is_deterministic() -> None:
    keys = chain_keys(DIGEST, DTYPE, IDS, BS)
    assert len(keys) == 3 and len(set(keys)) == 3
    assert keys == chain_keys(DIGEST, DTYPE, IDS[:12], BS)  # the partial block has no key
    assert keys[1] == block_key(DIGEST, DTYPE, keys[0], IDS[4:8])


def test_changing_a_token_changes_its_block_and_every_later_key() -> None:
    keys = chain_keys(DIGEST, DTYPE, IDS, BS)
    edited = list(IDS)
    edited[5] += 1  # in block 1
    other = chain_keys(DIGEST, DTYPE, edited, BS)
    assert other[0] == keys[0]
    assert other[1] != keys[1] and other[2] != keys[2]


def test_same_tokens_under_another_parent_get_another_key() -> None:
    a = block_key(DIGEST, DTYPE, block_key(DIGEST, DTYPE, None, [1, 2, 3, 4]), [5, 6, 7, 8])
    b = block_key(DIGEST, DTYPE, block_key(DIGEST, DTYPE, None, [1, 2, 3, 9]), [5, 6, 7, 8])
    assert a != b


@pytest.mark.parametrize("digest, dtype", [("abc124", DTYPE), (DIGEST, "bfloat16"), ("abc123+int8", DTYPE)])
def test_model_digest_and_dtype_change_every_key(digest: str, dtype: str) -> None:
    ours, theirs = chain_keys(DIGEST, DTYPE, IDS, BS), chain_keys(digest, dtype, IDS, BS)
    assert not set(ours) & set(theirs)


def test_fields_cannot_run_into_each_other() -> None:
    # "ab" + "c" and "a" + "bc" would hash alike without the separators
    assert block_key("ab", "c", None, [1]) != block_key("a", "bc", None, [1])


def test_bad_parent_and_token_ids_are_refused() -> None:
    with pytest.raises(ValueError):
        block_key(DIGEST, DTYPE, b"short", [1])
    with pytest.raises(OverflowError):
        block_key(DIGEST, DTYPE, None, [-1])
