"""Draft down on real services (SmolLM2 target, its untrained 4-layer slice as draft, the real
gateway, all on loopback): the draft server stops in the middle of a speculative stream; the
stream completes with no error and the tokens target-only greedy decoding gives, the rounds
after the stop ran on the target alone and say so in their spans; a request that starts while
the draft is down runs target-only from its first round."""

from __future__ import annotations

import grpc
import pytest
from servers import ServerThread

from gateway import metrics as m
from gateway.server import GatewayOptions, start_gateway
from services.draft.server import load_draft, start_draft
from services.runtime.settings import ServerSettings
from services.runtime.telemetry import setup_telemetry
from services.target.server import load_target, start_target
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow

MAX_NEW = 12


def request(policy: int) -> gateway_pb2.GatewayGenerateRequest:
    message = common_pb2.ChatMessage(role="user", content="Write a short story about a lighthouse keeper.")
    return gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=[message])),
        sampling=common_pb2.SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True),
        policy=policy,
        # a chain of 2 per round: enough rounds that the stop lands in the middle of the stream
        spec=gateway_pb2.SpecOptions(
            strategy=common_pb2.DRAFT_STRATEGY_CHAIN, budget=common_pb2.TreeBudget(max_depth=2)
        ),
    )


def test_stream_completes_target_only_when_the_draft_stops(smollm2_dir, draft_dir) -> None:
    target, draft = load_target(str(smollm2_dir), max_sessions=8), load_draft(str(draft_dir), max_sessions=8)
    telemetry = setup_telemetry("gateway", "memory", "memory", install_global=False)
    settings = ServerSettings(host="127.0.0.1", port=0, grace_seconds=0)
    state = {}

    async def start():
        state["target"] = await start_target(target, settings)
        state["draft"] = await start_draft(draft, settings)
        options = GatewayOptions(target=state["target"].address, draft=state["draft"].address)
        return await start_gateway(options, settings, telemetry=telemetry)

    try:
        with ServerThread(start) as thread, grpc.insecure_channel(thread.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            expected = list(stub.Generate(request(gateway_pb2.POLICY_TARGET), timeout=300).token_ids)

            stream = stub.GenerateStream(request(gateway_pb2.POLICY_SPECULATIVE), timeout=300)
            chunks = [next(stream) for _ in range(2)]
            thread.call(state["draft"].stop(grace=0))  # the only draft replica is gone
            chunks += list(stream)
            after = stub.Generate(request(gateway_pb2.POLICY_SPECULATIVE), timeout=300)
            thread.call(thread.server.stop(grace=1))
            thread.call(state["target"].stop(grace=1))
    finally:
        target.close()
        draft.close()

    assert [t for c in chunks for t in c.token_ids] == expected
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert list(after.token_ids) == expected

    spans = telemetry.finished_spans()
    first, second = sorted((s for s in spans if s.name == m.REQUEST_SPAN), key=lambda s: s.start_time)[1:]
    rounds = {
        r: sorted(
            (s for s in spans if s.parent and s.parent.span_id == r.context.span_id),
            key=lambda s: s.start_time,
        )
        for r in (first, second)
    }
    drafted = [s for s in rounds[first] if s.name == m.ROUND_SPAN and not s.attributes.get(m.DRAFT_FALLBACK)]
    fell_back = [s for s in rounds[first] if s.attributes.get(m.DRAFT_FALLBACK)]
    assert len(drafted) >= 2 and fell_back, "the draft served the first rounds, the target alone the rest"
    assert first.attributes[m.DRAFT_FALLBACK_ROUNDS] == len(fell_back)
    # the second request: every round fell back but the last, which has one token to emit and
    # would not draft anyway
    second_rounds = [s for s in rounds[second] if s.name == m.ROUND_SPAN]
    assert len(second_rounds) == after.spec_stats.rounds == MAX_NEW
    assert [bool(s.attributes.get(m.DRAFT_FALLBACK)) for s in second_rounds] == [True] * (MAX_NEW - 1) + [
        False
    ]
    assert second.attributes[m.DRAFT_FALLBACK_ROUNDS] == MAX_NEW - 1
    assert after.spec_stats.drafted_tokens == 0
