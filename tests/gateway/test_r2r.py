"""Policy r2r through the real gateway, with toy services: the toy draft's router knows where
the draft is wrong, so with its threshold the output is the target's, and the target is asked
only for the routed tokens, catching up in one Extend each time."""

from __future__ import annotations

import grpc
import pytest

from gateway.requests import R2R_WARNING
from services.runtime.errors import status_details
from specmesh.v1 import common_pb2, gateway_pb2

PROMPT = [5, 9, 11, 30]
N = 40


def request(threshold: float | None = None, n: int = N) -> gateway_pb2.GatewayGenerateRequest:
    route = gateway_pb2.RouteOptions()
    if threshold is not None:
        route.threshold = threshold
    return gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=PROMPT)),
        sampling=common_pb2.SamplingParams(max_new_tokens=n, ignore_eos=True),
        policy=gateway_pb2.POLICY_R2R,
        route=route,
    )


def unrolled(next_token, n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        out.append(next_token(PROMPT + out))
    return out


def extends(stack) -> list:
    return [r for name, r in stack.target.calls if name == "Extend"]


def test_a_router_that_flags_every_wrong_draft_token_gives_the_targets_output(make_stack, toy) -> None:
    stack = make_stack(draft=toy.FakeDraft(miss_every=4))
    r = stack.stub.Generate(request())  # the router's own threshold (0.5)
    target_only = unrolled(toy.next, N)
    assert list(r.token_ids) == target_only != unrolled(stack.draft.next, N)
    stats = r.spec_stats
    calls = extends(stack)
    assert stats.routed_tokens == len(calls) > 0 and stats.router_calls >= N - stats.routed_tokens
    assert not [name for name, _ in stack.target.calls if name not in ("Extend", "GetModelInfo")]
    # each Extend catches up on everything the target had not seen: every token reaches it once
    sent = [t for c in calls for t in c.session.new_tokens]
    assert sent == (PROMPT + target_only)[: len(sent)] and stats.catch_up_tokens == len(sent)
    # the draft is told each token once too (the kept ones, then the target's replacement)
    told = [t for c in stack.draft.calls for t in c.session.new_tokens]
    assert told == (PROMPT + target_only)[: len(told)]
    assert all(c.route and c.strategy == common_pb2.DRAFT_STRATEGY_CHAIN for c in stack.draft.calls)
    assert list(r.warnings) == [R2R_WARNING]


def test_threshold_one_is_the_draft_alone_and_zero_the_target_alone(make_stack, toy) -> None:
    stack = make_stack(draft=toy.FakeDraft(miss_every=4))
    r = stack.stub.Generate(request(threshold=1.0))
    assert list(r.token_ids) == unrolled(stack.draft.next, N) and r.spec_stats.routed_tokens == 0
    assert not extends(stack)
    r = stack.stub.Generate(request(threshold=0.0))
    assert list(r.token_ids) == unrolled(toy.next, N)
    assert r.spec_stats.routed_tokens == r.spec_stats.router_calls == N


def test_stream_equals_unary_and_the_draft_going_away_does_not_fail_the_request(make_stack, toy) -> None:
    stack = make_stack(draft=toy.FakeDraft(miss_every=3))
    unary = stack.stub.Generate(request(n=25))
    chunks = list(stack.stub.GenerateStream(request(n=25)))
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    stack.thread.call(stack.upstreams["draft"].stop(grace=0))
    r = stack.stub.Generate(request(n=12))  # every round on the target alone
    assert list(r.token_ids) == unrolled(toy.next, 12)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(quality=gateway_pb2.QUALITY_EXACT), "quality"),
        (dict(route=gateway_pb2.RouteOptions(threshold=-0.1)), "route.threshold"),
        (dict(policy=gateway_pb2.POLICY_SPECULATIVE), "route"),
    ],
)
def test_bad_route_requests_name_the_field(make_stack, toy, change, field) -> None:
    stack = make_stack()
    bad = request(threshold=0.3)
    for name, value in change.items():
        if hasattr(value, "CopyFrom"):
            getattr(bad, name).CopyFrom(value)
        else:
            setattr(bad, name, value)
    with pytest.raises(grpc.RpcError) as info:
        stack.stub.Generate(bad)
    code, message, violations = status_details(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and [v.field for v in violations] == [field], message
