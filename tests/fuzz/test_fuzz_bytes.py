"""Random bytes as the serialized request of every RPC of every service, and valid requests
with bytes overwritten or cut short. Protobuf parses many of them into some message, so this
also reaches the handlers with odd field values, unknown fields and truncated varints."""

from __future__ import annotations

import pytest
from fuzzing import ANY_ANSWER, examples
from hypothesis import given
from hypothesis import strategies as st

from specmesh.v1 import common_pb2, draft_pb2, gateway_pb2, scoring_pb2, target_pb2

SERVICES = {
    "target": target_pb2.DESCRIPTOR.services_by_name["TargetService"],
    "draft": draft_pb2.DESCRIPTOR.services_by_name["DraftService"],
    "scoring": scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"],
    "gateway": gateway_pb2.DESCRIPTOR.services_by_name["Gateway"],
}
METHODS = [(role, m) for role, service in SERVICES.items() for m in service.methods]
IDS = [f"{role}.{m.name}" for role, m in METHODS]

SESSION = common_pb2.SessionRef(session_id="bytes", new_tokens=[3, 4, 5])
SAMPLING = common_pb2.SamplingParams(max_new_tokens=3, temperature=0.7, top_k=5)
# A plausible request per input type, to overwrite bytes of (types without one start empty).
SEEDS = {
    m.DESCRIPTOR.full_name: m
    for m in (
        target_pb2.PrefillRequest(session=SESSION),
        target_pb2.VerifyRequest(
            session=SESSION,
            tree=common_pb2.TokenTree(tokens=[5, 6, 7], parents=[-1, 0, 0]),
            sampling=SAMPLING,
            rule=common_pb2.ACCEPTANCE_RULE_TREE_IID,
        ),
        target_pb2.ExtendRequest(session=SESSION, sampling=SAMPLING),
        target_pb2.ScoreRequest(input=common_pb2.Prompt(text="the wind in the trees"), top_logprobs=2),
        target_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="the wind"), sampling=SAMPLING),
        draft_pb2.DraftPrefillRequest(session=SESSION),
        draft_pb2.ProposeRequest(
            session=SESSION, budget=common_pb2.TreeBudget(max_nodes=4, max_depth=2), sampling=SAMPLING
        ),
        gateway_pb2.GatewayGenerateRequest(prompt=common_pb2.Prompt(text="the wind"), sampling=SAMPLING),
        scoring_pb2.DetectRequest(input=common_pb2.Prompt(text="the wind in the trees")),
        scoring_pb2.MembershipRequest(input=common_pb2.Prompt(text="the wind in the trees")),
        scoring_pb2.UncertaintyRequest(input=common_pb2.Prompt(text="the wind in the trees")),
        scoring_pb2.AttributeRequest(
            context=common_pb2.Prompt(text="the wind in the trees"), max_new_tokens=2
        ),
    )
}


def path(role: str, method) -> str:
    return f"/{SERVICES[role].full_name}/{method.name}"


@pytest.mark.parametrize(("role", "method"), METHODS, ids=IDS)
def test_random_bytes(fuzzer, role, method) -> None:
    @examples(110)
    @given(st.binary(max_size=48) | st.binary(min_size=48, max_size=4096))
    def case(data: bytes) -> None:
        fuzzer.expect(ANY_ANSWER, role, path(role, method), data, streaming=method.server_streaming)

    case()


@pytest.mark.parametrize(("role", "method"), METHODS, ids=IDS)
def test_overwritten_requests(fuzzer, role, method) -> None:
    seed = SEEDS.get(method.input_type.full_name)
    base = seed.SerializeToString() if seed is not None else b""

    @examples(55)
    @given(
        st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=6),
        st.integers(1, 4096),
    )
    def case(writes: list[tuple[int, int]], keep: int) -> None:
        data = bytearray(base)
        for pos, value in writes:
            if data:
                data[pos % len(data)] = value
            else:
                data.append(value)
        fuzzer.expect(
            ANY_ANSWER, role, path(role, method), bytes(data[:keep]), streaming=method.server_streaming
        )

    case()
