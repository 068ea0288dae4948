"""The gateway's scoring front door (gateway/scoring.py): two real scoring replicas (tiny random
models imported from synthetic GGUFs through the real loading path) behind the real gateway.
Replies through the gateway equal the replica's own; bad input keeps its status and field; a
replica that goes away moves the calls to the other; without replicas the calls say how to
configure them."""

from __future__ import annotations

import grpc
import pytest
from front_doors import relayed

from services.runtime.errors import status_details
from services.scoring.server import load_scoring, start_scoring
from specmesh.v1 import common_pb2, scoring_pb2, scoring_pb2_grpc

S = scoring_pb2
TEXT = common_pb2.Prompt(text="the wind in the trees is a thin, high voice.")


def _strip_timing(reply):
    reply.ClearField("timing")
    return reply


@pytest.fixture(scope="module")
def scoring_models(tiny_gguf, tmp_path_factory):
    from services.core import model_import as mi

    root = tmp_path_factory.mktemp("front-door-models")
    return mi.import_gguf(tiny_gguf().path, "tiny", root=root, progress=False, license="apache-2.0")


@pytest.fixture
def front_door(toy, scoring_models):
    """A toy target (the gateway needs one), two scoring replicas and the gateway over them."""
    servicers = [load_scoring(str(scoring_models), pack_weights=False) for _ in range(2)]
    with relayed(toy, "scoring", servicers, start_scoring, scoring_pb2_grpc.ScoringServiceStub) as state:
        yield state
    for s in servicers:
        s.close()


def test_replies_through_the_gateway_are_the_replicas_own(front_door) -> None:
    via, direct = front_door["via_gateway"], front_door["direct"]
    calls = [
        ("Detect", S.DetectRequest(input=TEXT, per_token=True)),
        ("Uncertainty", S.UncertaintyRequest(input=TEXT)),
        ("Membership", S.MembershipRequest(input=TEXT)),
        ("Attribute", S.AttributeRequest(context=TEXT, max_new_tokens=2, method=S.ATTRIBUTION_METHOD_RANDOM)),
    ]
    for method, request in calls:
        got = _strip_timing(getattr(via, method)(request, timeout=60))
        want = _strip_timing(getattr(direct, method)(request, timeout=60))
        assert got == want, method
        assert got.ByteSize() > 0, method

    # bad input: the replica's status, message and field violation reach the client unchanged
    for stub in (via, direct):
        with pytest.raises(grpc.RpcError) as info:
            stub.Detect(S.DetectRequest(input=common_pb2.Prompt(text="")), timeout=60)
        code, _, violations = status_details(info.value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and [v.field for v in violations] == ["input.text"]


def test_a_replica_that_goes_away_moves_the_calls(front_door) -> None:
    via, thread = front_door["via_gateway"], front_door["thread"]
    pool = front_door["gateway"].app.scoring
    for replica in pool.replicas:  # the health watch would notice too; the failed call must suffice
        thread.call(_cancel(replica.watch))
    first, second = front_door["replicas"]
    thread.call(first.stop(grace=0))
    for _ in range(4):  # whichever replica each call picks, every one is answered
        assert via.Detect(S.DetectRequest(input=TEXT), timeout=60).scores
    (gone,) = [r for r in pool.replicas if r.address == first.address]
    assert not gone.available and all(r.sessions == 0 for r in pool.replicas)
    thread.call(second.stop(grace=0))
    with pytest.raises(grpc.RpcError) as info:
        via.Detect(S.DetectRequest(input=TEXT), timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def _cancel(task) -> None:
    if task is not None:
        task.cancel()


def test_without_scoring_replicas_the_calls_say_how_to_configure_them(make_stack) -> None:
    stack = make_stack()
    with pytest.raises(grpc.RpcError) as info:
        scoring_pb2_grpc.ScoringServiceStub(stack.channel).Detect(S.DetectRequest(input=TEXT), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "--scoring HOST:PORT" in info.value.details()
