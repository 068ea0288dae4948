"""Policy auto through the real gateway, with toy services: it probes the draft, chooses, says
what it chose and why, and its output is the chosen policy's."""

from __future__ import annotations

import math
import time

from specmesh.v1 import common_pb2, gateway_pb2

PROMPT = [5, 9, 11, 30]
N = 30


def request(quality: int = gateway_pb2.QUALITY_UNSPECIFIED, n: int = N, temperature: float = 0.0):
    return gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=PROMPT)),
        sampling=common_pb2.SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=temperature),
        policy=gateway_pb2.POLICY_AUTO,
        quality=quality,
    )


def unrolled(next_token, n: int = N) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        out.append(next_token(PROMPT + out))
    return out


def test_exact_is_the_targets_output_whichever_policy_it_picks(make_stack, toy) -> None:
    stack = make_stack(draft=toy.FakeDraft(miss_every=3))
    for quality in (gateway_pb2.QUALITY_UNSPECIFIED, gateway_pb2.QUALITY_EXACT):
        r = stack.stub.Generate(request(quality))
        assert list(r.token_ids) == unrolled(toy.next)
        assert r.auto.policy == gateway_pb2.POLICY_SPECULATIVE and "exact" in r.auto.reason
    # the gateway measured the draft's acceptance on those requests; were it as low as a poor
    # draft's, speculative decoding would lose and auto turns to the target alone
    assert stack.gateway.servicer.acceptance() is not None
    stack.gateway.servicer.acceptance.value = 0.05
    r = stack.stub.Generate(request(gateway_pb2.QUALITY_EXACT))
    assert list(r.token_ids) == unrolled(toy.next)
    assert r.auto.policy == gateway_pb2.POLICY_TARGET and "acceptance" in r.auto.reason
    deadline = time.monotonic() + 5
    while stack.draft.sessions and time.monotonic() < deadline:  # releases run in the background
        time.sleep(0.01)
    assert not stack.draft.sessions  # the probe's draft session was released


def test_high_routes_easy_prompts_and_verifies_hard_ones(make_stack, toy) -> None:
    easy = make_stack(draft=toy.FakeDraft(miss_every=0, logprob=math.log(0.6)))
    r = easy.stub.Generate(request(gateway_pb2.QUALITY_HIGH))
    assert r.auto.policy == gateway_pb2.POLICY_R2R and list(r.token_ids) == unrolled(toy.next)
    assert list(r.warnings) and "r2r" in r.warnings[0]  # the chosen policy's warning is said
    hard = make_stack(draft=toy.FakeDraft(miss_every=1, logprob=math.log(0.6)))
    r = hard.stub.Generate(request(gateway_pb2.QUALITY_HIGH))
    assert r.auto.policy == gateway_pb2.POLICY_SPECULATIVE and list(r.token_ids) == unrolled(toy.next)


def test_fast_picks_the_draft_when_it_is_sure_and_r2r_otherwise(make_stack, toy) -> None:
    sure = make_stack(draft=toy.FakeDraft(miss_every=4))  # reports probability 1 for its tokens
    r = sure.stub.Generate(request(gateway_pb2.QUALITY_FAST))
    assert r.auto.policy == gateway_pb2.POLICY_DRAFT and list(r.token_ids) == unrolled(sure.draft.next)
    unsure = make_stack(draft=toy.FakeDraft(miss_every=4, logprob=math.log(0.5)))
    chunks = list(unsure.stub.GenerateStream(request(gateway_pb2.QUALITY_FAST)))
    assert chunks[0].auto.policy == gateway_pb2.POLICY_R2R and not any(c.HasField("auto") for c in chunks[1:])
    assert [t for c in chunks for t in c.token_ids] == unrolled(toy.next)  # the toy router is perfect


def test_without_a_draft_auto_is_the_target(make_stack, toy) -> None:
    stack = make_stack(draft=None)
    r = stack.stub.Generate(request(gateway_pb2.QUALITY_FAST))
    assert r.auto.policy == gateway_pb2.POLICY_TARGET and list(r.token_ids) == unrolled(toy.next)
