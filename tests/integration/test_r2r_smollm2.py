"""Policies r2r and auto on real weights: the SmolLM2 target, a slice draft served with a router
trained for it (tests/conftest.py `trained_router`), and the gateway, over gRPC in this process.

Threshold 0 routes every token (the target's greedy output), threshold 1 none (the draft's);
in between every emitted token is the draft's greedy token or, where routed, the target's; auto
with quality exact equals target-only greedy output.
"""

from __future__ import annotations

import grpc
import pytest
import torch
from servers import ServerThread

from gateway.server import GatewayOptions, start_gateway
from services.draft.server import load_draft, start_draft
from services.runtime.errors import status_details
from services.runtime.settings import ServerSettings
from services.target.server import load_target, start_target
from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow

N = 12
PROMPTS = ["What is a pipe in a shell?", "Write a Python function that reverses a list."]


@pytest.fixture(scope="module")
def stack(smollm2_dir, trained_router):
    target = load_target(str(smollm2_dir), max_sessions=8)
    # fp32, not int8: int8 quantises a forward's activations with one scale for all its rows, so
    # the draft's tokens would depend on how many rows a forward had (a routed chain forwards
    # one token at a time, policy draft prefills accepted runs), and near-ties could flip
    draft = load_draft(
        str(trained_router.draft_dir), max_sessions=8, router=trained_router.router_dir, int8=False
    )
    assert draft.features() == ["route"]
    settings = ServerSettings(host="127.0.0.1", port=0, grace_seconds=1)
    state = {}

    async def start():
        state["target"] = await start_target(target, settings)
        state["draft"] = await start_draft(draft, settings)
        options = GatewayOptions(target=state["target"].address, draft=state["draft"].address)
        return await start_gateway(options, settings)

    with ServerThread(start) as thread:
        channel = grpc.insecure_channel(thread.address)
        draft_channel = grpc.insecure_channel(state["draft"].address)
        stack_ = (gateway_pb2_grpc.GatewayStub(channel), target, draft)
        yield (*stack_, draft_pb2_grpc.DraftServiceStub(draft_channel))
        draft_channel.close()
        channel.close()
        thread.call(thread.server.stop(grace=1))
        for name in ("draft", "target"):
            thread.call(state[name].stop(grace=1))
    target.close()
    draft.close()


def request(text: str, policy: int, **kw) -> gateway_pb2.GatewayGenerateRequest:
    threshold = kw.pop("threshold", None)
    r = gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(
            chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=text)])
        ),
        sampling=common_pb2.SamplingParams(max_new_tokens=N, ignore_eos=True),
        policy=policy,
        **kw,
    )
    if threshold is not None:
        r.route.threshold = threshold
    return r


def greedy_choices(servicer, prompt: list[int], output: list[int]) -> list[int]:
    """The servicer's model's greedy token at each output position, teacher-forced on `output`."""
    engine = servicer.engine
    seq = engine.new_sequence()
    try:
        logits = engine.extend(seq, prompt + output)[len(prompt) - 1 : -1]  # [len(output), C]
    finally:
        seq.release()
    columns = logits.argmax(-1)
    ids = engine.vocab_ids[columns] if engine.vocab_ids is not None else columns
    return ids.tolist()


@torch.inference_mode()
def test_thresholds_zero_and_one_are_the_target_and_the_draft_alone(stack) -> None:
    stub, *_ = stack
    for text in PROMPTS[:1]:
        target_only = stub.Generate(request(text, gateway_pb2.POLICY_TARGET)).token_ids
        draft_only = stub.Generate(request(text, gateway_pb2.POLICY_DRAFT)).token_ids
        all_routed = stub.Generate(request(text, gateway_pb2.POLICY_R2R, threshold=0.0))
        assert list(all_routed.token_ids) == list(target_only)
        assert all_routed.spec_stats.routed_tokens == all_routed.spec_stats.router_calls == N
        none_routed = stub.Generate(request(text, gateway_pb2.POLICY_R2R, threshold=1.0))
        assert list(none_routed.token_ids) == list(draft_only) and none_routed.spec_stats.routed_tokens == 0


@torch.inference_mode()
def test_every_token_is_the_drafts_or_where_routed_the_targets(stack) -> None:
    stub, target, draft, _ = stack
    tokenizer = target.tokenizer
    for text in PROMPTS:
        r = stub.Generate(request(text, gateway_pb2.POLICY_R2R, threshold=0.5))
        out = list(r.token_ids)
        prompt = tokenizer.encode_chat([{"role": "user", "content": text}])
        t_choice = greedy_choices(target, prompt, out)
        d_choice = greedy_choices(draft, prompt, out)
        assert all(tok in (t, d) for tok, t, d in zip(out, t_choice, d_choice, strict=True))
        taken_from_target = sum(tok == t != d for tok, t, d in zip(out, t_choice, d_choice, strict=True))
        assert taken_from_target <= r.spec_stats.routed_tokens <= N
        assert r.spec_stats.catch_up_tokens >= len(prompt) if r.spec_stats.routed_tokens else True


def test_auto_exact_is_target_only_greedy_output(stack) -> None:
    stub, *_ = stack
    for text in PROMPTS[1:]:
        target_only = stub.Generate(request(text, gateway_pb2.POLICY_TARGET)).token_ids
        for quality in (gateway_pb2.QUALITY_UNSPECIFIED, gateway_pb2.QUALITY_EXACT):
            r = stub.Generate(request(text, gateway_pb2.POLICY_AUTO, quality=quality))
            assert list(r.token_ids) == list(target_only), r.auto
            assert (
                r.auto.policy in (gateway_pb2.POLICY_TARGET, gateway_pb2.POLICY_SPECULATIVE) and r.auto.reason
            )


def test_bad_routed_proposals_name_the_field(stack) -> None:
    *_, draft_stub = stack
    ref = common_pb2.SessionRef(session_id="bad-route", new_tokens=[1, 504, 3458], expected_length=3)
    cases = [
        (dict(route_threshold=1.5), "route_threshold"),
        (dict(route_threshold=float("nan")), "route_threshold"),
        (dict(strategy=common_pb2.DRAFT_STRATEGY_DYNAMIC_TREE), "strategy"),
        (dict(budget=common_pb2.TreeBudget(lookup_tokens=4)), "strategy"),
    ]
    for fields, field in cases:
        with pytest.raises(grpc.RpcError) as e:
            draft_stub.Propose(draft_pb2.ProposeRequest(session=ref, route=True, **fields))
        code, message, violations = status_details(e.value)
        assert (code, [v.field for v in violations]) == (grpc.StatusCode.INVALID_ARGUMENT, [field]), message
    ok = draft_stub.Propose(draft_pb2.ProposeRequest(session=ref, route=True))  # nothing was committed
    assert ok.session_length == 3 and len(ok.divergence) == len(ok.tree.tokens) >= 1
