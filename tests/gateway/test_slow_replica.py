"""A slow target replica (real gRPC toy servers on loopback, the real gateway): the attempt's
deadline fires, the round is retried on the other replica, and the stream completes with the
tokens a request on a healthy replica gives; with no other replica the deadline is the error."""

from __future__ import annotations

import grpc
import pytest
from servers import ServerThread

from gateway.config import GatewayConfig
from gateway.server import GatewayOptions, start_gateway
from services.runtime.server import serve
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

MAX_NEW = 12


def _request() -> gateway_pb2.GatewayGenerateRequest:
    return gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(text="w5 w9 w11"),
        sampling=common_pb2.SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True),
        policy=gateway_pb2.POLICY_SPECULATIVE,
    )


@pytest.fixture
def slow_and_fast(toy):
    slow, fast = toy.FakeTarget(toy.tokenizer, delay_s=3.0), toy.FakeTarget(toy.tokenizer)
    state: dict = {}

    async def start():
        state["servers"] = [await serve(toy.register_target(f), toy.settings("t")) for f in (slow, fast)]
        state["servers"].append(await serve(toy.register_draft(toy.FakeDraft()), toy.settings("d")))
        options = GatewayOptions(
            # the slow replica first: a new session goes there (fewest sessions, then address order)
            target=[s.address for s in state["servers"][:2]],
            draft=state["servers"][2].address,
            tokenizer_dir=toy.tokenizer_dir,
            config=GatewayConfig(attempt_timeout_s=0.5),
        )
        return await start_gateway(options, toy.settings("gw"))

    with ServerThread(start) as thread, grpc.insecure_channel(thread.address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel), slow, fast, thread.server.servicer.pools["target"]
        thread.call(thread.server.stop(grace=0))
        for server in state["servers"]:
            thread.call(server.stop(grace=0))


def test_a_slow_replica_times_out_and_the_round_is_retried_elsewhere(slow_and_fast, toy) -> None:
    stub, slow, fast, pool = slow_and_fast
    reply = stub.Generate(_request(), timeout=30)
    assert slow.verifies == 1  # its one attempt ran past the 0.5 s attempt deadline
    assert fast.verifies >= 1 and pool.moves == 1  # the session moved to the fast replica
    expected, context = [], toy.tokenizer.encode("w5 w9 w11")
    for _ in range(MAX_NEW):  # the toy target's own greedy continuation
        expected.append(toy.next(context + expected))
    assert list(reply.token_ids) == expected


def test_without_time_left_the_deadline_is_the_clients_error(slow_and_fast) -> None:
    stub, slow, _, pool = slow_and_fast
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(_request(), timeout=0.4)  # shorter than one attempt: no time to retry
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert pool.moves == 0
