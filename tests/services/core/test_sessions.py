"""Session store: the expected_length contract, limits, expiry and release of KV blocks."""

import pytest
from tiny_models import tiny_config

from services.core.engine import Engine
from services.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.core.sessions import SessionStore, fingerprint


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


def test_commit_adds_to_the_history(engine: Engine) -> None:
    store = SessionStore(engine.new_sequence)
    turn = store.begin("a", [1, 2], 2)
    assert turn.created and turn.new == [1, 2] and turn.session.length == 0
    turn.session.commit(turn.new)
    assert store.length("a") == 2 and store.length("unknown") == 0
    again = store.begin("a", [3], 3)
    assert not again.created and again.session is turn.session


def test_rollback_releases_a_session_the_call_created(engine: Engine) -> None:
    free = engine.pool.free_blocks
    store = SessionStore(engine.new_sequence)
    turn = store.begin("a", [1] * 9, 9)
    engine.prefill(turn.seq, [1] * 9)  # forwarded, never committed
    store.rollback(turn)
    assert "a" not in store and engine.pool.free_blocks == free


def test_rollback_keeps_an_existing_session_as_it_was(engine: Engine) -> None:
    store = SessionStore(engine.new_sequence)
    first = store.begin("a", [1, 2, 3], 3)
    engine.prefill(first.seq, [1, 2, 3])
    first.session.commit(first.new)
    turn = store.begin("a", [4] * 6, 9)
    engine.prefill(turn.seq, [4] * 6)  # KV past the committed tokens
    store.rollback(turn)
    session = store.get("a")
    assert session is first.session and session.tokens == [1, 2, 3] and session.seq.length == 3


def test_replay_answers_only_the_identical_last_call(engine: Engine) -> None:
    store = SessionStore(engine.new_sequence)
    key, other = fingerprint(b"request"), fingerprint(b"other request")
    assert key == fingerprint(b"request") and key != other and len(key) == 32  # sha256
    assert store.replay("a", key) is None  # no such session
    session = store.begin("a", [1], 1).session
    assert store.replay("a", key) is None  # nothing remembered yet
    reply = object()
    session.remember(key, reply)
    assert store.replay("a", key) is reply
    assert store.replay("a", other) is None
    session.remember(other, "newer")
    assert store.replay("a", key) is None and store.replay("a", other) == "newer"
