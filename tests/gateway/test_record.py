"""The request record: all request state, through JSON and back, enough to continue a request."""

from __future__ import annotations

import json

from gateway.budget import AdaptiveBudget, Budget
from gateway.policies import run_policy
from gateway.record import RequestRecord
from specmesh.v1 import common_pb2, gateway_pb2


def _request(**sampling) -> gateway_pb2.GatewayGenerateRequest:
    return gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(text="w5 w9 w11"),
        sampling=common_pb2.SamplingParams(max_new_tokens=40, ignore_eos=True, **sampling),
        policy=gateway_pb2.POLICY_SPECULATIVE,
        spec=gateway_pb2.SpecOptions(strategy=common_pb2.DRAFT_STRATEGY_STATIC_TREE, adaptive=True),
    )


async def _run(servicer, record: RequestRecord, rounds: int | None = None) -> RequestRecord:
    """Run `record`'s request to its end, or stop (releasing its sessions) after `rounds` chunks."""
    span = servicer.ins.tracer.start_span("test")
    chunks = run_policy(await servicer.policy_context(span, timeout=lambda: 30.0), record)
    try:
        async for _ in chunks:
            if rounds is not None and record.rounds >= rounds:
                break
    finally:
        await chunks.aclose()
        span.end()
    await servicer.drain()
    return record


def test_a_request_continues_from_its_serialised_record(make_stack) -> None:
    stack = make_stack()
    servicer = stack.gateway.servicer

    async def scenario():
        plan, max_context = await servicer.plan(_request(temperature=0.8, seed=7))
        whole = await _run(servicer, RequestRecord("whole", plan, max_context))
        first = await _run(servicer, RequestRecord("parted", plan, max_context), rounds=3)
        return whole, first, json.dumps(first.to_dict())

    whole, first, saved = stack.thread.call(scenario())
    assert whole.finish == common_pb2.FINISH_REASON_LENGTH and len(whole.tokens) == 40
    assert first.rounds == 3 and 0 < len(first.tokens) < 40

    restored = RequestRecord.from_dict(json.loads(saved))
    assert restored == first  # every field survives JSON
    assert restored.adaptive is not None  # the adaptive budget's state is part of it
    rounds = ("Verify", "Extend")  # the adaptive budget may skip drafting, then a round is an Extend
    calls_before = len([c for c in stack.target.calls if c[0] in rounds])
    rest = stack.thread.call(_run(servicer, restored))
    assert rest.tokens == whole.tokens and rest.finish == whole.finish
    assert rest.stats.rounds == rest.rounds
    # the continuation's first round re-prefilled the whole sequence (the sessions were released)
    # and drew from the random stream where the first part left it
    resumed = [c[1] for c in stack.target.calls if c[0] in rounds][calls_before]
    assert resumed.random.counter == 3 and resumed.random.seed == 7
    assert list(resumed.session.new_tokens) == [*first.plan.prompt_ids, *first.tokens]


def test_adaptive_state_roundtrip() -> None:
    a = AdaptiveBudget(Budget(max_nodes=8, max_depth=4, branching=2))
    a.update(2, 4, draft_s=0.01, verify_s=0.03, verified_tokens=9)
    b = AdaptiveBudget(Budget(max_nodes=8, max_depth=4, branching=2))
    b.restore(json.loads(json.dumps(a.state())))
    assert b.state() == a.state() and b.current() == a.current()
    assert b.verify_s == {9: 0.03}  # JSON's string keys come back as token counts


def test_a_kv_budget_survives_the_record() -> None:
    from dataclasses import replace

    from gateway.requests import Plan
    from services.core.params import GenerationParams, KVBudget

    plan = Plan(
        policy=gateway_pb2.POLICY_TARGET,
        model="m",
        prompt_ids=(5, 9),
        operation="text_completion",
        params=GenerationParams(seed=3),
        sampling=common_pb2.SamplingParams(seed=3),
    )
    for budget in (None, KVBudget(64, 0.25)):
        record = RequestRecord(session_id="s", plan=replace(plan, kv_budget=budget), max_context=256)
        back = RequestRecord.from_dict(json.loads(json.dumps(record.to_dict())))
        assert back.plan.kv_budget == budget
