"""Replica pools end to end: two target and two draft replicas (toy services on loopback) behind
the real gateway. A target replica that goes away between rounds moves the request to the other
one, which re-prefills; the output is the one an uninterrupted request produces."""

from __future__ import annotations

import time

import grpc
import pytest
from servers import ServerThread

from gateway.policies.calls import BUSY_RETRIES
from gateway.server import GatewayOptions, start_gateway
from services.runtime.errors import retry_delay
from services.runtime.server import serve
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

MAX_NEW = 60


@pytest.fixture
def replicas(toy):
    """Two toy targets (each Verify takes 20 ms, so a test can act between rounds), two drafts."""
    targets = [toy.FakeTarget(toy.tokenizer, delay_s=0.02) for _ in range(2)]
    drafts = [toy.FakeDraft() for _ in range(2)]
    state: dict = {}

    async def start():
        state["targets"] = [await serve(toy.register_target(t), toy.settings("toy-target")) for t in targets]
        state["drafts"] = [await serve(toy.register_draft(d), toy.settings("toy-draft")) for d in drafts]
        options = GatewayOptions(
            target=[s.address for s in state["targets"]],
            draft=",".join(s.address for s in state["drafts"]),
            tokenizer_dir=toy.tokenizer_dir,
        )
        state["gateway"] = await start_gateway(options, toy.settings("gw"))
        return state["gateway"]

    with ServerThread(start) as thread:
        with grpc.insecure_channel(thread.address) as channel:
            state.update(thread=thread, stub=gateway_pb2_grpc.GatewayStub(channel), fakes=targets)
            yield state
        for server in state["targets"] + state["drafts"]:
            thread.call(server.stop(grace=0))


def _request(**spec) -> gateway_pb2.GatewayGenerateRequest:
    return gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(text="w5 w9 w11"),
        sampling=common_pb2.SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True),
        policy=gateway_pb2.POLICY_SPECULATIVE,
        spec=gateway_pb2.SpecOptions(**spec),
    )


async def _stop_watching(pool) -> None:
    for replica in pool.replicas:
        replica.watch.cancel()


def _fake_at(replicas, address: str):
    """The toy target servicer behind the server listening on `address`."""
    (fake,) = [f for f, s in zip(replicas["fakes"], replicas["targets"], strict=True) if s.address == address]
    return fake


def _wait_for_a_hanging_verify(fake) -> None:
    """Make `fake`'s next Verify hang and return once it has started (so a stop lands mid-call)."""
    seen = len(fake.calls)
    fake.delay_s = 30.0
    deadline = time.monotonic() + 10
    while len(fake.calls) <= seen and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(fake.calls) > seen, "the gateway sent no further Verify"


@pytest.mark.parametrize("noticed_by", ["health watch", "failed call", "call in flight"])
def test_a_target_replica_that_goes_away_mid_request_changes_nothing(replicas, noticed_by) -> None:
    """Either the health watch reports the replica gone before the next round, or (watch stopped)
    the next round's Verify fails with UNAVAILABLE, or the replica stops while a Verify is in
    flight (the call ends CANCELLED); each time the round is re-sent to the other replica."""
    stub, thread = replicas["stub"], replicas["thread"]
    uninterrupted = stub.Generate(_request(), timeout=30)
    assert len(uninterrupted.token_ids) == MAX_NEW

    pool = replicas["gateway"].servicer.pools["target"]
    stream = stub.GenerateStream(_request(), timeout=30)
    tokens: list[int] = []
    for _ in range(3):  # three rounds in, the request's target session lives on one replica
        tokens += next(stream).token_ids
    (holder,) = [r for r in pool.replicas if r.sessions > 0]
    if noticed_by != "health watch":
        thread.call(_stop_watching(pool))
    victim = next(s for s in replicas["targets"] if s.address == holder.address)
    if noticed_by == "call in flight":
        (victim_fake,) = [
            f for f, s in zip(replicas["fakes"], replicas["targets"], strict=True) if s is victim
        ]
        _wait_for_a_hanging_verify(victim_fake)
    thread.call(victim.stop(grace=0))
    last = None
    for chunk in stream:
        tokens += chunk.token_ids
        last = chunk
    assert tokens == list(uninterrupted.token_ids)
    assert last is not None and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    # the survivor took over with one Verify that re-sent the whole sequence under a fresh session
    (survivor,) = [f for f, s in zip(replicas["fakes"], replicas["targets"], strict=True) if s is not victim]
    resent = [
        req.session
        for name, req in survivor.calls
        if name == "Verify" and req.session.expected_length == len(req.session.new_tokens) > 3
    ]
    assert len(resent) == 1 and resent[0].new_tokens[:3] == [5, 9, 11], resent
    assert pool.moves == 1
    assert not holder.available  # the gateway stopped choosing the replica that went away


def test_a_cancelled_verify_moves_the_round_to_the_other_replica(replicas) -> None:
    """A server that stops mid-call may end the call CANCELLED rather than UNAVAILABLE (which of
    the two the client sees depends on whether its GOAWAY or the stream reset arrives first);
    the gateway takes either as the replica going away and re-sends the round elsewhere."""
    stub = replicas["stub"]
    uninterrupted = stub.Generate(_request(), timeout=30)
    pool = replicas["gateway"].servicer.pools["target"]
    stream = stub.GenerateStream(_request(), timeout=30)
    tokens = list(next(stream).token_ids)
    (holder,) = [r for r in pool.replicas if r.sessions > 0]
    _fake_at(replicas, holder.address).fail_verify = grpc.StatusCode.CANCELLED
    for chunk in stream:
        tokens += chunk.token_ids
    assert tokens == list(uninterrupted.token_ids)
    assert pool.moves == 1


def test_a_busy_replica_is_waited_for_then_its_refusal_reaches_the_client(replicas, toy) -> None:
    """A replica whose queue is full answers RESOURCE_EXHAUSTED with a RetryInfo: the gateway
    waits the delay and tries the same replica again (no move, no re-prefill), so a short burst
    changes nothing; a replica that stays busy past BUSY_RETRIES waits has its refusal, hint
    included, passed on to the client."""
    stub = replicas["stub"]
    uninterrupted = stub.Generate(_request(), timeout=30)
    pool = replicas["gateway"].servicer.pools["target"]
    stream = stub.GenerateStream(_request(), timeout=30)
    tokens = list(next(stream).token_ids)
    (holder,) = [r for r in pool.replicas if r.sessions > 0]
    fake = _fake_at(replicas, holder.address)
    fake.busy_verifies = BUSY_RETRIES
    for chunk in stream:
        tokens += chunk.token_ids
    assert tokens == list(uninterrupted.token_ids)
    assert fake.busy_verifies == 0 and pool.moves == 0

    for f in replicas["fakes"]:
        f.busy_verifies = 10 * (BUSY_RETRIES + 1)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(_request(), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in info.value.details()
    assert retry_delay(info.value) == toy.BUSY_RETRY_DELAY_S
