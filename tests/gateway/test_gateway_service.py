"""The real gateway over fake target / draft services (a toy model, no torch) on loopback."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import metrics as m
from gateway.config import GatewayConfig
from gateway.record import draft_seed
from gateway.requests import DRAFT_WARNING
from services.runtime.errors import status_details
from specmesh.v1 import common_pb2, gateway_pb2

STRATEGIES = [
    common_pb2.DRAFT_STRATEGY_CHAIN,
    common_pb2.DRAFT_STRATEGY_STATIC_TREE,
    common_pb2.DRAFT_STRATEGY_DYNAMIC_TREE,
    common_pb2.DRAFT_STRATEGY_MULTI_CANDIDATE,
    common_pb2.DRAFT_STRATEGY_PROMPT_LOOKUP,
]
PROMPT = [5, 9, 11, 30]


def ids(tokens) -> common_pb2.Prompt:
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(tokens)))


def req(policy=gateway_pb2.POLICY_SPECULATIVE, prompt=PROMPT, spec=None, **sampling):
    sampling.setdefault("max_new_tokens", 40)
    sampling.setdefault("ignore_eos", True)
    return gateway_pb2.GatewayGenerateRequest(
        prompt=ids(prompt),
        sampling=common_pb2.SamplingParams(**sampling),
        policy=policy,
        spec=spec or gateway_pb2.SpecOptions(),
    )


def greedy(toy, prompt, n, stop_ids=()) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        out.append(toy.next(list(prompt) + out))
        if out[-1] in stop_ids:
            break
    return out


def wait_for(predicate, timeout=5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def rpc_error(call, *args):
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args)
        if hasattr(result, "__iter__") and not isinstance(result, gateway_pb2.GatewayGenerateResponse):
            list(result)
    return status_details(info.value)


@pytest.fixture
def stack(make_stack):
    return make_stack()


# --- losslessness and policies --------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES, ids=common_pb2.DraftStrategy.Name)
def test_greedy_speculative_equals_target_only(stack, toy, strategy) -> None:
    expected = greedy(toy, PROMPT, 40)
    target = stack.stub.Generate(req(gateway_pb2.POLICY_TARGET))
    assert list(target.token_ids) == expected
    spec = stack.stub.Generate(req(spec=gateway_pb2.SpecOptions(strategy=strategy)))
    assert list(spec.token_ids) == expected
    assert spec.text == target.text == toy.tokenizer.decode(expected)
    assert spec.finish_reason == common_pb2.FINISH_REASON_LENGTH
    s = spec.spec_stats
    assert 1 < s.rounds < 40 and 0 < s.accepted_tokens < s.drafted_tokens
    assert s.mean_accepted_length == pytest.approx((s.accepted_tokens + s.rounds) / s.rounds)
    assert s.acceptance_rate == pytest.approx(s.accepted_tokens / s.drafted_tokens)
    # along the walked path: every accepted token, plus the rejected position of rounds not
    # ending on a leaf; per depth: each accepted token is counted at its depth
    assert s.accepted_tokens <= s.verified_path_tokens <= s.accepted_tokens + s.rounds
    assert s.path_acceptance_rate == pytest.approx(s.accepted_tokens / s.verified_path_tokens)
    assert sum(s.accepted_by_depth) == s.accepted_tokens and s.rounds_by_depth[0] <= s.rounds
    assert all(a <= r for a, r in zip(s.accepted_by_depth, s.rounds_by_depth, strict=True))
    assert spec.usage.prompt_tokens == len(PROMPT) and spec.usage.output_tokens == 40
    assert target.spec_stats.mean_accepted_length == 1.0 and target.spec_stats.drafted_tokens == 0
    assert not spec.warnings and not target.warnings


def test_perfect_draft_is_fully_accepted(make_stack, toy) -> None:
    stack = make_stack(draft=toy.FakeDraft(miss_every=0))
    r = stack.stub.Generate(req(max_new_tokens=36))  # default chain of 5: 6 tokens per round
    assert list(r.token_ids) == greedy(toy, PROMPT, 36)
    s = r.spec_stats
    assert s.acceptance_rate == 1.0 and s.rounds == 6 and s.mean_accepted_length == 6.0
    assert s.path_acceptance_rate == 1.0 and s.verified_path_tokens == 30  # every chain ends on its leaf
    assert list(s.rounds_by_depth) == list(s.accepted_by_depth) == [6] * 5


def test_adaptive_budget_grows_for_a_perfect_draft(make_stack, toy) -> None:
    stack = make_stack(draft=toy.FakeDraft(miss_every=0), config=GatewayConfig(adaptive_max_depth=9))
    r = stack.stub.Generate(req(max_new_tokens=60, spec=gateway_pb2.SpecOptions(adaptive=True)))
    assert list(r.token_ids) == greedy(toy, PROMPT, 60)
    depths = [c.budget.max_depth for c in stack.draft.calls]
    assert depths[:5] == [5, 6, 7, 8, 9] and max(depths) == 9


def test_adaptive_budget_shrinks_for_a_poor_draft(make_stack, toy) -> None:
    stack = make_stack(draft=toy.FakeDraft(miss_every=1))  # always wrong
    spec = gateway_pb2.SpecOptions(adaptive=True, budget=common_pb2.TreeBudget(max_nodes=8, max_depth=8))
    r = stack.stub.Generate(req(max_new_tokens=20, spec=spec))
    assert list(r.token_ids) == greedy(toy, PROMPT, 20)
    assert r.spec_stats.accepted_tokens == 0 and r.spec_stats.rounds == 20
    depths = [c.budget.max_depth for c in stack.draft.calls]
    # the first round drafts the requested depth; later ones never draft deeper, and rounds the
    # budget expects the target alone to win send no Propose at all (see test_units)
    assert depths[0] == 8 and max(depths[1:], default=0) <= 8 and len(depths) <= 20


@pytest.mark.parametrize("limit", [1, 0], ids=["limit-1", "no-limit"])
def test_a_busy_target_runs_rounds_without_the_draft(make_stack, toy, limit) -> None:
    """Two speculative streams on one target replica: with spec_max_streams=1 their rounds while
    both are in flight are plain target steps (Extend, no Propose); with 0 (the control) every
    round drafts. The output is the target's greedy output either way."""
    from concurrent.futures import ThreadPoolExecutor

    stack = make_stack(
        config=GatewayConfig(spec_max_streams=limit), target=toy.FakeTarget(toy.tokenizer, delay_s=0.02)
    )
    expected = greedy(toy, PROMPT, 30)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(stack.stub.Generate, req(max_new_tokens=30))
        wait_for(lambda: stack.target.verifies >= 1)  # the first stream holds a target session
        second = pool.submit(stack.stub.Generate, req(max_new_tokens=30))
        replies = [first.result(timeout=30), second.result(timeout=30)]
    assert [list(r.token_ids) for r in replies] == [expected, expected]
    extends = sum(1 for name, _ in stack.target.calls if name == "Extend")
    rounds = sum(r.spec_stats.rounds for r in replies)
    proposes = len(stack.draft.calls)
    if limit:
        assert extends > 0 and proposes < rounds  # rounds with both streams in flight did not draft
        assert all(r.spec_stats.drafted_tokens > 0 for r in replies)  # alone, each one drafted
    else:
        assert extends == 0 and proposes == rounds


def test_draft_policy_is_the_draft_alone(stack, toy) -> None:
    r = stack.stub.Generate(req(gateway_pb2.POLICY_DRAFT, max_new_tokens=30))
    out: list[int] = []
    while len(out) < 30:
        out.append(stack.draft.next(PROMPT + out))
    assert list(r.token_ids) == out != greedy(toy, PROMPT, 30)
    assert all(c.strategy == common_pb2.DRAFT_STRATEGY_CHAIN for c in stack.draft.calls)
    assert not [c for c in stack.target.calls if c[0] != "Generate"]  # the target is never asked
    assert r.spec_stats.rounds == 0 and r.spec_stats.drafted_tokens >= 30
    assert list(r.warnings) == [DRAFT_WARNING]  # low-quality text is never silent
    chunks = list(stack.stub.GenerateStream(req(gateway_pb2.POLICY_DRAFT, max_new_tokens=30)))
    assert list(chunks[0].warnings) == [DRAFT_WARNING] and not any(c.warnings for c in chunks[1:])


def test_default_policy_is_speculative(stack, toy) -> None:
    r = stack.stub.Generate(req(gateway_pb2.POLICY_UNSPECIFIED))
    assert list(r.token_ids) == greedy(toy, PROMPT, 40) and r.spec_stats.rounds > 0


# --- streaming, usage, stops -----------------------------------------------------------------------


@pytest.mark.parametrize("policy", [gateway_pb2.POLICY_TARGET, gateway_pb2.POLICY_SPECULATIVE])
def test_stream_matches_unary(stack, toy, policy) -> None:
    chunks = list(stack.stub.GenerateStream(req(policy, max_new_tokens=25)))
    unary = stack.stub.Generate(req(policy, max_new_tokens=25))
    assert len(chunks) > 1
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert "".join(c.text for c in chunks) == unary.text
    assert all(not c.finish_reason for c in chunks[:-1]) and chunks[-1].finish_reason
    last = chunks[-1]
    assert last.usage.output_tokens == 25 and last.usage.prompt_tokens == len(PROMPT) and last.usage.seed
    assert last.session_id and all(c.session_id == last.session_id for c in chunks)
    assert last.HasField("spec_stats")


def eos_prompt(toy, n=30):
    """A prompt whose greedy continuation reaches EOS within n tokens."""
    for a in range(2, 64):
        for b in range(2, 64):
            if toy.EOS in greedy(toy, [a, b], n, stop_ids={toy.EOS}):
                return [a, b]
    raise AssertionError("no prompt reaches EOS")


@pytest.mark.parametrize("policy", [gateway_pb2.POLICY_TARGET, gateway_pb2.POLICY_SPECULATIVE])
def test_eos_stops_both_policies_alike(stack, toy, policy) -> None:
    prompt = eos_prompt(toy)
    expected = greedy(toy, prompt, 30, stop_ids={toy.EOS})
    r = stack.stub.Generate(req(policy, prompt=prompt, max_new_tokens=30, ignore_eos=False))
    assert list(r.token_ids) == expected and expected[-1] == toy.EOS
    assert r.finish_reason == common_pb2.FINISH_REASON_EOS and r.usage.output_tokens == len(expected)


@pytest.mark.parametrize("policy", [gateway_pb2.POLICY_TARGET, gateway_pb2.POLICY_SPECULATIVE])
def test_stop_ids_and_strings(stack, toy, policy) -> None:
    full = greedy(toy, PROMPT, 40)
    stop_id = full[17]
    cut = full[: full.index(stop_id) + 1]
    r = stack.stub.Generate(req(policy, stop_token_ids=[stop_id]))
    assert list(r.token_ids) == cut and r.finish_reason == common_pb2.FINISH_REASON_EOS

    words = toy.tokenizer.decode(full).split(" ")
    stop = f"{words[12]} {words[13]}"
    r = stack.stub.Generate(req(policy, stop=[stop]))
    assert r.finish_reason == common_pb2.FINISH_REASON_STOP_STRING
    full_text = toy.tokenizer.decode(full)
    assert r.text == full_text[: full_text.index(stop)]
    assert list(r.token_ids) == full[: len(r.token_ids)]


def test_max_new_tokens_truncates_the_last_round(make_stack, toy) -> None:
    stack = make_stack(draft=toy.FakeDraft(miss_every=0))
    for n in (1, 2, 7, 13):
        r = stack.stub.Generate(req(max_new_tokens=n))
        assert list(r.token_ids) == greedy(toy, PROMPT, n)
        assert r.finish_reason == common_pb2.FINISH_REASON_LENGTH
    # the last round's tree is capped to the tokens still needed (n=13: 6 + 6 + 1, where the
    # last token needs no draft at all: the target's next token is all that is left)
    assert [c.budget.max_depth for c in stack.draft.calls][-2:] == [5, 5]
    assert [name for name, _ in stack.target.calls][-3:] == ["Verify", "Verify", "Extend"]
    stack.draft.calls.clear()
    stack.stub.Generate(req(max_new_tokens=10))  # 6 + 4: the second tree is 3 deep
    assert [c.budget.max_depth for c in stack.draft.calls] == [5, 3]


def test_text_and_chat_prompts_are_tokenized_by_the_gateway(stack, toy) -> None:
    r = stack.stub.Generate(
        gateway_pb2.GatewayGenerateRequest(
            prompt=common_pb2.Prompt(text="w5 w9 w11 w30"),
            sampling=common_pb2.SamplingParams(max_new_tokens=10, ignore_eos=True),
        )
    )
    assert list(r.token_ids) == greedy(toy, PROMPT, 10)
    chat = common_pb2.Prompt(
        chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="w7")])
    )
    r = stack.stub.Generate(
        gateway_pb2.GatewayGenerateRequest(
            prompt=chat, sampling=common_pb2.SamplingParams(max_new_tokens=10, ignore_eos=True)
        )
    )
    assert list(r.token_ids) == greedy(toy, toy.tokenizer.encode("user w7 w2"), 10)
    assert r.usage.prompt_tokens == 3


# --- sessions, random streams, recovery ------------------------------------------------------------


def test_session_protocol_and_release(stack, toy) -> None:
    r = stack.stub.Generate(req(max_new_tokens=30))
    calls = stack.draft.calls
    verifies = [c for name, c in stack.target.calls if name == "Verify"]
    assert len(calls) == len(verifies) == r.spec_stats.rounds
    sid = calls[0].session.session_id
    assert sid == r.session_id and all(c.session.session_id == sid for c in calls)
    # first calls carry the prompt; later ones only what the service has not seen
    assert list(calls[0].session.new_tokens) == PROMPT and calls[0].session.expected_length == len(PROMPT)
    assert list(verifies[0].session.new_tokens) == PROMPT
    out = list(r.token_ids)
    for i, v in enumerate(verifies[1:], 1):
        assert len(v.session.new_tokens) == 1 and v.random.counter == i
        assert v.session.expected_length == len(PROMPT) + len(out[: v.session.expected_length - len(PROMPT)])
    for prev, cur in zip(verifies, verifies[1:], strict=False):
        assert cur.session.new_tokens[0] == out[cur.session.expected_length - len(PROMPT) - 1]
        assert prev.rule == common_pb2.ACCEPTANCE_RULE_GREEDY
    wait_for(lambda: sid in stack.target.released and sid in stack.draft.released)
    assert not stack.target.sessions and not stack.draft.sessions


def test_random_streams(stack) -> None:
    r = stack.stub.Generate(req(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=77))
    assert r.usage.seed == 77
    verifies = [c for name, c in stack.target.calls if name == "Verify"]
    assert [(v.random.seed, v.random.counter) for v in verifies] == [(77, i) for i in range(len(verifies))]
    assert [(p.random.seed, p.random.counter) for p in stack.draft.calls] == [
        (draft_seed(77), i) for i in range(len(verifies))
    ]
    assert all(v.sampling.temperature == pytest.approx(0.8) and v.sampling.seed == 77 for v in verifies)
    assert all(v.rule == common_pb2.ACCEPTANCE_RULE_CHAIN for v in verifies)  # passed through from Propose
    a = stack.stub.Generate(req(max_new_tokens=4, temperature=0.8))
    b = stack.stub.Generate(req(max_new_tokens=4, temperature=0.8))
    assert a.usage.seed != b.usage.seed  # fresh seeds when none is given


def test_lost_target_session_is_rebuilt(make_stack, toy) -> None:
    stack = make_stack(target=toy.FakeTarget(toy.tokenizer, forget_every=3))
    r = stack.stub.Generate(req(max_new_tokens=40))
    assert list(r.token_ids) == greedy(toy, PROMPT, 40)
    verifies = [c for name, c in stack.target.calls if name == "Verify"]
    sids = list(dict.fromkeys(v.session.session_id for v in verifies))
    assert len(sids) > 1  # a fresh session after each eviction
    first_of_second = next(v for v in verifies if v.session.session_id == sids[1])
    assert first_of_second.session.expected_length == len(first_of_second.session.new_tokens) > len(PROMPT)
    wait_for(lambda: set(sids) <= set(stack.target.released))


def test_empty_proposals_fall_back_to_extend(make_stack, toy) -> None:
    stack = make_stack(draft=toy.FakeDraft(empty=True))
    spec = gateway_pb2.SpecOptions(strategy=common_pb2.DRAFT_STRATEGY_PROMPT_LOOKUP)
    r = stack.stub.Generate(req(max_new_tokens=10, spec=spec))
    assert list(r.token_ids) == greedy(toy, PROMPT, 10)
    assert {name for name, _ in stack.target.calls} == {"Extend"}
    assert r.spec_stats.rounds == 10 and r.spec_stats.drafted_tokens == 0


def test_cancelled_stream_releases_sessions(stack) -> None:
    stream = stack.stub.GenerateStream(req(max_new_tokens=200, prompt=[3, 4]))
    next(stream)
    stream.cancel()
    wait_for(lambda: stack.target.released and stack.draft.released)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_, code, field",
    [
        (req(max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_new_tokens"),
        (req(max_new_tokens=500), grpc.StatusCode.OUT_OF_RANGE, "sampling.max_new_tokens"),
        (req(prompt=[]), grpc.StatusCode.INVALID_ARGUMENT, "prompt.token_ids.ids"),
        (req(temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
        (req(policy=23), grpc.StatusCode.INVALID_ARGUMENT, "policy"),
        (req(spec=gateway_pb2.SpecOptions(strategy=9)), grpc.StatusCode.INVALID_ARGUMENT, "spec.strategy"),
        (
            req(spec=gateway_pb2.SpecOptions(budget=common_pb2.TreeBudget(max_nodes=10_000))),
            grpc.StatusCode.OUT_OF_RANGE,
            "spec.budget.max_nodes",
        ),
        (
            gateway_pb2.GatewayGenerateRequest(model="nope", prompt=ids(PROMPT)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model",
        ),
        (  # a resume request carries nothing the session already holds
            gateway_pb2.GatewayGenerateRequest(session_id="s1", prompt=ids(PROMPT)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt",
        ),
        (gateway_pb2.GatewayGenerateRequest(session_id="s1"), grpc.StatusCode.NOT_FOUND, "session_id"),
        (
            gateway_pb2.GatewayGenerateRequest(prompt=ids(PROMPT), resume_from=3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "resume_from",
        ),
        (  # an H2O budget is for policy target alone, and never exact
            gateway_pb2.GatewayGenerateRequest(
                prompt=ids(PROMPT), kv_budget=common_pb2.KVBudget(max_tokens=64)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "kv_budget",
        ),
        (
            gateway_pb2.GatewayGenerateRequest(
                prompt=ids(PROMPT),
                policy=gateway_pb2.POLICY_TARGET,
                quality=gateway_pb2.QUALITY_EXACT,
                kv_budget=common_pb2.KVBudget(max_tokens=64),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "kv_budget",
        ),
        (
            gateway_pb2.GatewayGenerateRequest(
                prompt=ids(PROMPT),
                policy=gateway_pb2.POLICY_TARGET,
                kv_budget=common_pb2.KVBudget(max_tokens=2),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "kv_budget.max_tokens",
        ),
    ],
)
def test_bad_requests(stack, request_, code, field) -> None:
    for call in (stack.stub.Generate, stack.stub.GenerateStream):
        got, message, violations = rpc_error(call, request_)
        assert got == code, message
        assert [v.field for v in violations] == [field] and field in message
    health = health_pb2_grpc.HealthStub(stack.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert stack.stub.Generate(req(max_new_tokens=3)).usage.output_tokens == 3  # still serving


def test_upstream_errors_keep_their_code(make_stack, toy) -> None:
    stack = make_stack(target=toy.FakeTarget(toy.tokenizer, fail_verify=grpc.StatusCode.RESOURCE_EXHAUSTED))
    code, message, _ = rpc_error(stack.stub.Generate, req())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "verify failed on purpose" in message
    wait_for(lambda: stack.draft.released)  # the draft session is released on failure too


def test_draft_policies_without_a_draft(make_stack, toy) -> None:
    stack = make_stack(draft=None)
    code, _, violations = rpc_error(stack.stub.Generate, req())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and violations[0].field == "policy"
    assert list(stack.stub.Generate(req(gateway_pb2.POLICY_TARGET)).token_ids) == greedy(toy, PROMPT, 40)


def test_list_models_lists_what_model_accepts(stack) -> None:
    models = stack.stub.ListModels(gateway_pb2.ListModelsRequest()).models
    assert [x.name for x in models] == ["toy-target"]  # the draft assists; it is not requestable
    for model in models:  # every listed name is accepted as `model`
        named = req(max_new_tokens=4)
        named.model = model.name
        assert stack.stub.Generate(named).token_ids
    draft = req()
    draft.model = "toy-draft"
    code, _, violations = rpc_error(stack.stub.Generate, draft)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and violations[0].field == "model"


# --- telemetry ------------------------------------------------------------------------------


def test_one_trace_spans_gateway_draft_and_target(make_stack, toy) -> None:
    stack = make_stack(memory_telemetry=True)
    r = stack.stub.Generate(req(max_new_tokens=20))
    wait_for(lambda: stack.target.released and stack.draft.released)
    spans = {name: t.finished_spans() for name, t in stack.telemetry.items()}
    request_spans = [s for s in spans["gateway"] if s.name == m.REQUEST_SPAN]
    assert len(request_spans) == 1
    request_span = request_spans[0]
    trace_id = request_span.context.trace_id
    rounds = [s for s in spans["gateway"] if s.name == m.ROUND_SPAN]
    assert len(rounds) == r.spec_stats.rounds
    for i, s in enumerate(sorted(rounds, key=lambda s: s.attributes[m.ROUND])):
        assert s.context.trace_id == trace_id and s.parent.span_id == request_span.context.span_id
        assert s.attributes[m.ROUND] == i
        assert (
            1 <= s.attributes[m.DRAFTED] <= 5 and 0 <= s.attributes[m.ACCEPTED_LEN] <= s.attributes[m.DRAFTED]
        )
    assert sum(s.attributes[m.ACCEPTED_LEN] for s in rounds) == r.spec_stats.accepted_tokens
    a = request_span.attributes
    assert a[m.REQUEST_MODEL] == "toy-target" and a[m.USAGE_OUTPUT_TOKENS] == 20
    assert a[m.USAGE_INPUT_TOKENS] == len(PROMPT) and a[m.POLICY] == "speculative"
    assert list(a[m.RESPONSE_FINISH_REASONS]) == ["length"]
    # the upstream services' server spans belong to the same trace, under the round spans
    round_ids = {s.context.span_id for s in rounds}
    gateway_ids = {s.context.span_id: s for s in spans["gateway"]}
    for service, method in (("draft", "Propose"), ("target", "Verify")):
        server = [s for s in spans[service] if s.name.endswith(f"/{method}")]
        assert len(server) == r.spec_stats.rounds
        for s in server:
            assert s.context.trace_id == trace_id
            client = gateway_ids[s.parent.span_id]  # the gateway's client span ...
            assert client.parent.span_id in round_ids  # ... inside a round span
    # metrics
    gw = stack.telemetry["gateway"]
    (ttft,) = gw.metric_points(m.TIME_TO_FIRST_TOKEN)
    (tpot,) = gw.metric_points(m.TIME_PER_OUTPUT_TOKEN)
    assert ttft.count == 1 and tpot.count == 1 and ttft.sum > 0
    (accepted,) = gw.metric_points(m.ACCEPTED_LENGTH)
    assert accepted.count == r.spec_stats.rounds and accepted.sum == r.spec_stats.accepted_tokens


def test_policy_target_passes_a_kv_budget_on_and_says_the_output_is_approximate(make_stack, toy) -> None:
    target = toy.FakeTarget(toy.tokenizer)
    stack = make_stack(target=target)
    request = req(gateway_pb2.POLICY_TARGET, max_new_tokens=5)
    request.kv_budget.max_tokens = 64
    r = stack.stub.Generate(request)
    (sent,) = [call for name, call in target.calls if name == "Generate"]
    assert (sent.kv_budget.max_tokens, sent.kv_budget.recent_share) == (64, 0.75)  # 0.75: the default
    assert any("kv_budget" in w and "64 keys" in w for w in r.warnings)
    plain = stack.stub.Generate(req(gateway_pb2.POLICY_TARGET, max_new_tokens=5))
    assert not plain.warnings and not target.calls[-1][1].HasField("kv_budget")


def test_target_policy_trace(make_stack) -> None:
    stack = make_stack(memory_telemetry=True)
    stack.stub.Generate(req(gateway_pb2.POLICY_TARGET, max_new_tokens=5))
    (request_span,) = [s for s in stack.telemetry["gateway"].finished_spans() if s.name == m.REQUEST_SPAN]
    (server,) = [s for s in stack.telemetry["target"].finished_spans() if s.name.endswith("/Generate")]
    assert server.context.trace_id == request_span.context.trace_id
    assert request_span.attributes[m.USAGE_OUTPUT_TOKENS] == 5


def test_invalid_utf8_is_invalid_argument(stack) -> None:
    """A message protobuf cannot parse (invalid UTF-8 in prompt.text) is INVALID_ARGUMENT, not INTERNAL."""
    good = gateway_pb2.GatewayGenerateRequest(prompt=common_pb2.Prompt(text="w5 w6")).SerializeToString()
    bad = good.replace(b"w5 w6", b"w5\xff\xfe")
    assert bad != good
    for method in ("Generate", "GenerateStream"):
        call = (stack.channel.unary_unary if method == "Generate" else stack.channel.unary_stream)(
            f"/specmesh.v1.Gateway/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call(bad, timeout=10)) if method == "GenerateStream" else call(bad, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "UTF-8" in info.value.details()
    health = health_pb2_grpc.HealthStub(stack.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert stack.stub.Generate(req(max_new_tokens=3)).usage.output_tokens == 3


def test_prompts_too_long_name_the_prompt(stack, toy) -> None:
    # 30 MB of text: refused by its length before it is tokenized
    huge = gateway_pb2.GatewayGenerateRequest(prompt=common_pb2.Prompt(text="w5 " * 10_000_000))
    code, message, violations = rpc_error(stack.stub.Generate, huge)
    assert code == grpc.StatusCode.OUT_OF_RANGE and [v.field for v in violations] == ["prompt.text"], message
    # short enough to tokenize, too many tokens: the prompt is named, not max_new_tokens
    long = gateway_pb2.GatewayGenerateRequest(prompt=common_pb2.Prompt(text="w5 " * toy.MAX_CONTEXT))
    code, message, violations = rpc_error(stack.stub.Generate, long)
    assert code == grpc.StatusCode.OUT_OF_RANGE and [v.field for v in violations] == ["prompt"], message
