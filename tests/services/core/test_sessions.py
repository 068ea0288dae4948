"""Session store: the expected_length contract, limits, expiry and release of KV blocks."""

import pytest
from tiny_models import tiny_config

from services.core.engine import Engine
from services.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.core.sessions import SessionStore


@pytest.fixture
def engine() -> Engine:
    return Engine.from_config(tiny_config(), block_size=4)


def test_expected_length_must_match(engine: Engine) -> None:
    store = SessionStore(engine.new_sequence)
    s = store.open("a", [1, 2, 3], 3)
    engine.prefill(s.seq, [1, 2, 3])
    s.tokens += [1, 2, 3]
    with pytest.raises(FailedPrecondition) as e:
        store.open("a", [4], 3)  # a retry that already counted its tokens
    assert e.value.field == "session.expected_length"
    assert store.get("a").length == 3  # unchanged by the refused call
    assert store.open("a", [4], 4) is s


def test_new_session_needs_full_prefix(engine: Engine) -> None:
    store = SessionStore(engine.new_sequence)
    with pytest.raises(FailedPrecondition):
        store.open("fresh", [7], 10)  # a replica that never saw this session
    assert "fresh" not in store
    with pytest.raises(InvalidArgument):
        store.open("", [1], 1)


def test_limits_and_expiry_release_blocks(engine: Engine) -> None:
    free = engine.pool.free_blocks
    store = SessionStore(engine.new_sequence, max_sessions=2, ttl_seconds=5)
    for sid in ("a", "b"):
        s = store.open(sid, [1] * 9, 9)
        engine.prefill(s.seq, [1] * 9)
        s.tokens += [1] * 9
    with pytest.raises(ResourceExhausted):
        store.open("c", [1], 1)
    assert store.expire_idle(now=store.get("a").last_used + 60) == 2
    assert len(store) == 0 and engine.pool.free_blocks == free
    assert store.release("a") is False
