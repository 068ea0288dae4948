"""Resuming a stream on another gateway replica: two gateways share a real Valkey session store
in front of the same toy services; the first one stops mid-stream (grace 0, as in a crash) and
the client resumes on the second with its session id and the count of tokens it received."""

from __future__ import annotations

import grpc
import pytest
from servers import ServerThread

from gateway.server import GatewayOptions, start_gateway
from services.runtime.server import serve
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

MAX_NEW = 50


@pytest.fixture
def two_gateways(toy, redis_server):
    state: dict = {}

    async def start():
        target = toy.FakeTarget(toy.tokenizer, delay_s=0.02)  # 20 ms rounds: time to act mid-stream
        state["target"] = await serve(toy.register_target(target), toy.settings("toy-target"))
        state["draft"] = await serve(toy.register_draft(toy.FakeDraft()), toy.settings("toy-draft"))
        options = GatewayOptions(
            target=state["target"].address,
            draft=state["draft"].address,
            tokenizer_dir=toy.tokenizer_dir,
            redis_url=redis_server.url,
        )
        state["gateways"] = [await start_gateway(options, toy.settings(f"gw{i}")) for i in range(2)]
        return state["gateways"][0]

    with ServerThread(start) as thread:
        channels = [grpc.insecure_channel(g.address) for g in state["gateways"]]
        state["stubs"] = [gateway_pb2_grpc.GatewayStub(c) for c in channels]
        state["thread"] = thread
        yield state
        for c in channels:
            c.close()
        for server in [*state["gateways"][1:], state["draft"], state["target"]]:
            thread.call(server.stop(grace=0))


def _request(policy=gateway_pb2.POLICY_SPECULATIVE, **sampling) -> gateway_pb2.GatewayGenerateRequest:
    return gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(text="w5 w9 w11"),
        sampling=common_pb2.SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, **sampling),
        policy=policy,
    )


def _resume(stub, session_id: str, received: int) -> list[gateway_pb2.GenerateChunk]:
    request = gateway_pb2.GatewayGenerateRequest(session_id=session_id, resume_from=received)
    return list(stub.GenerateStream(request, timeout=30))


@pytest.mark.parametrize("policy", [gateway_pb2.POLICY_SPECULATIVE, gateway_pb2.POLICY_DRAFT])
def test_another_gateway_resumes_a_stream_whose_gateway_went_away(two_gateways, policy) -> None:
    (a, b), thread = two_gateways["stubs"], two_gateways["thread"]
    whole = b.Generate(_request(policy, seed=5), timeout=30)
    assert len(whole.token_ids) == MAX_NEW

    stream = a.GenerateStream(_request(policy, seed=5), timeout=30)
    received: list[int] = []
    chunks = [next(stream) for _ in range(3)]
    for chunk in chunks:
        assert chunk.offset == len(received)  # each chunk says where its tokens start
        received += chunk.token_ids
    thread.call(two_gateways["gateways"][0].stop(grace=0))
    with pytest.raises(grpc.RpcError):
        for chunk in stream:  # what was already on the wire, then the broken stream
            received += chunk.token_ids
    assert len(received) < MAX_NEW

    rest = _resume(b, chunks[0].session_id, len(received))
    assert rest[0].offset == len(received)
    tokens = received + [t for c in rest for t in c.token_ids]
    assert tokens == list(whole.token_ids)
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert rest[-1].usage.output_tokens == MAX_NEW and rest[-1].session_id == chunks[0].session_id

    # a finished stream resumes too: the tokens the client missed, then the finish
    again = _resume(b, chunks[0].session_id, MAX_NEW - 4)
    assert [t for c in again for t in c.token_ids] == list(whole.token_ids)[-4:]
    assert again[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_resume_checks(two_gateways) -> None:
    a, b = two_gateways["stubs"]
    done = a.Generate(_request(), timeout=30)
    with pytest.raises(grpc.RpcError) as info:
        _resume(b, done.session_id, MAX_NEW + 1)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE and "resume_from" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        _resume(b, "no-such-session", 0)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
