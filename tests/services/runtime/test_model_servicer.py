"""The model-servicer base: model info, the model-id check, session open after every check,
idempotent replay with this call's timing, Release, and the sweep of idle sessions."""

from __future__ import annotations

import asyncio

import pytest
from tiny_models import tiny_config

from services.core.engine import Engine
from services.core.errors import InvalidArgument, OutOfRange
from services.runtime.model_servicer import ModelServicer
from services.runtime.worker import Clock
from specmesh.v1 import common_pb2, target_pb2


@pytest.fixture
def servicer():
    s = ModelServicer(Engine.from_config(tiny_config(), block_size=4), max_sessions=4, license="apache-2.0")
    yield s
    s.close()


def ref(session_id: str, new: list[int], expected: int) -> common_pb2.SessionRef:
    return common_pb2.SessionRef(session_id=session_id, new_tokens=new, expected_length=expected)


def test_model_info_and_model_check(servicer: ModelServicer) -> None:
    info = asyncio.run(servicer.GetModelInfo(common_pb2.GetModelInfoRequest(), None))
    engine = servicer.engine
    assert (info.name, info.family, info.vocab_size) == (engine.name, "llama", 97)
    assert info.max_context == engine.max_context and info.digest == engine.digest
    assert info.dtype == "float32" and info.parameters == engine.parameter_count()
    assert info.license == "apache-2.0"

    class NoDtype(ModelServicer):
        reports_dtype = False

    other = NoDtype(engine, worker=servicer._worker)
    assert not other._model_info().dtype
    servicer._check_model("")
    servicer._check_model(engine.name)
    with pytest.raises(InvalidArgument) as e:
        servicer._check_model("other")
    assert e.value.field == "model" and "other" in e.value.message


def test_refused_open_leaves_no_session(servicer: ModelServicer) -> None:
    with pytest.raises(OutOfRange) as e:
        servicer._open_session(ref("a", [1, 500], 2))
    assert e.value.field == "session.new_tokens"
    with pytest.raises(OutOfRange) as e:
        servicer._open_session(ref("a", [1, 2], 2), servicer.engine.max_context, "tree.tokens")
    assert e.value.field == "tree.tokens"

    def refuse(length: int) -> None:
        assert length == 2
        raise InvalidArgument("no", "budget")

    with pytest.raises(InvalidArgument):
        servicer._open_session(ref("a", [1, 2], 2), check=refuse)
    assert "a" not in servicer.sessions


def test_open_append_and_release(servicer: ModelServicer) -> None:
    turn = servicer._open_session(ref("a", [1, 2, 3], 3))
    assert turn.created and turn.session.length == 0  # tokens count once the forward ran
    logits, cached = servicer._append(turn)
    assert logits.shape == (97,) and turn.session.length == 3 == turn.seq.length and cached == 0
    again = servicer._open_session(ref("a", [4], 4))
    assert not again.created and again.session is turn.session

    release = servicer.Release
    assert asyncio.run(release(common_pb2.ReleaseRequest(session_id="a"), None)).released
    assert not asyncio.run(release(common_pb2.ReleaseRequest(session_id="a"), None)).released
    with pytest.raises(InvalidArgument) as e:
        asyncio.run(release(common_pb2.ReleaseRequest(), None))
    assert e.value.field == "session_id"


def test_replay_returns_a_copy_with_this_calls_timing(servicer: ModelServicer) -> None:
    request = target_pb2.VerifyRequest(session=ref("a", [1], 1))
    key = servicer._fingerprint(request)
    assert key == servicer._fingerprint(target_pb2.VerifyRequest(session=ref("a", [1], 1)))
    assert servicer._replayed("a", key) is None
    turn = servicer._open_session(request.session)
    reply = target_pb2.VerifyResponse(next_token=5, session_length=1)
    turn.session.remember(key, reply)
    assert servicer._replayed("a", key) is reply
    assert servicer._replayed("a", servicer._fingerprint(target_pb2.VerifyRequest())) is None
    out = servicer._timed(reply, Clock())
    assert out is not reply and out.next_token == 5 and out.timing.total_ns > 0
    assert not reply.HasField("timing")  # the remembered reply stays as it was


def test_engine_thread_times_calls(servicer: ModelServicer) -> None:
    clock = Clock()
    assert asyncio.run(servicer._on_engine(clock, sum, [1, 2])) == 3
    assert clock.timing().total_ns >= clock.forward_ns >= 0


def test_idle_sessions_expire_without_further_calls() -> None:
    """A session left open frees its KV after its TTL even when no call comes to expire it."""
    target = ModelServicer(Engine.from_config(tiny_config(), block_size=4), session_ttl_seconds=0.2)
    left_open = ref("left-open", list(range(3, 12)), 9)
    pool = target.engine.pool

    async def open_and_wait() -> tuple[int, int]:
        await target._on_engine(Clock(), lambda: target._append(target._open_session(left_open)))
        opened = (len(target.sessions), pool.max_blocks - pool.free_blocks)
        for _ in range(100):  # up to 5 s, far past the TTL plus one sweep interval (0.05 s)
            await asyncio.sleep(0.05)
            if not target.sessions:
                break
        return opened

    try:
        (sessions, used) = asyncio.run(open_and_wait())
        assert sessions == 1 and used >= 2
        assert len(target.sessions) == 0 and pool.max_blocks - pool.free_blocks == 0
    finally:
        target.close()
