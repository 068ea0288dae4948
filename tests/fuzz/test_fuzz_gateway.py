"""The public Gateway under hostile requests (any policy, quality, strategy, budget, sampling,
prompt, session and resume offset), and invalid UTF-8 in every string field of every service's
requests, which must be INVALID_ARGUMENT naming that field."""

from __future__ import annotations

import pytest
from fuzzing import ANY_ANSWER, INT32, TEXT, VOCAB, C, budgets, examples, prompts, sampling, session_ids
from hypothesis import given
from hypothesis import strategies as st

from specmesh.v1 import common_pb2, draft_pb2, gateway_pb2, scoring_pb2, target_pb2

GATEWAY = "/specmesh.v1.Gateway/"


SANE_SAMPLING = st.builds(
    common_pb2.SamplingParams,
    temperature=st.sampled_from([0.0, 0.0, 0.7, 1.2]),
    top_k=st.sampled_from([0, 0, 1, 8]),
    top_p=st.sampled_from([0.0, 0.9]),
    max_new_tokens=st.integers(1, 8),
    ignore_eos=st.booleans(),
)
SANE_PROMPTS = st.builds(
    common_pb2.Prompt, text=st.sampled_from(["the wind", "in the north", "a"])
) | st.builds(
    common_pb2.Prompt,
    token_ids=st.builds(
        common_pb2.TokenIds, ids=st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=12)
    ),
)
SERVED_POLICIES = [
    gateway_pb2.POLICY_UNSPECIFIED,
    gateway_pb2.POLICY_TARGET,
    gateway_pb2.POLICY_DRAFT,
    gateway_pb2.POLICY_SPECULATIVE,
]
# the one field a case makes hostile (None: a request the gateway must serve)
HOSTILE = [
    None,
    None,
    "model",
    "prompt",
    "sampling",
    "policy",
    "quality",
    "strategy",
    "budget",
    "vocab_limit",
    "session",
    "resume",
]


@st.composite
def gateway_requests(draw) -> tuple[gateway_pb2.GatewayGenerateRequest, str | None]:
    """A request the gateway serves, then (usually) one field of it made hostile."""
    request = gateway_pb2.GatewayGenerateRequest(
        prompt=draw(SANE_PROMPTS),
        sampling=draw(SANE_SAMPLING),
        policy=draw(st.sampled_from(SERVED_POLICIES)),
        spec=gateway_pb2.SpecOptions(
            strategy=draw(st.sampled_from(list(common_pb2.DraftStrategy.values()))),
            budget=common_pb2.TreeBudget(
                # 0 or >= 3: an unset num_candidates (3) must fit in max_nodes
                max_nodes=draw(st.sampled_from([0, 3, 4, 6])),
                max_depth=draw(st.integers(0, 3)),
            ),
            adaptive=draw(st.booleans()),
        ),
    )
    hostile = draw(st.sampled_from(HOSTILE))
    if hostile == "model":
        request.model = draw(st.sampled_from(["tiny-draft", "other", "TINY"]) | TEXT)
    elif hostile == "prompt":
        request.prompt.CopyFrom(draw(prompts(VOCAB)))
    elif hostile == "sampling":
        params = draw(sampling())
        params.max_new_tokens = draw(st.integers(0, 8) | st.just(params.max_new_tokens))
        request.sampling.CopyFrom(params)
    elif hostile == "policy":
        request.policy = draw(st.sampled_from(list(gateway_pb2.Policy.values())) | INT32)
    elif hostile == "quality":
        request.quality = draw(st.integers(-1, 9) | INT32)
    elif hostile == "strategy":
        request.spec.strategy = draw(st.integers(-1, 9) | INT32)
    elif hostile == "budget":
        request.spec.budget.CopyFrom(draw(budgets()))
    elif hostile == "vocab_limit":
        request.spec.vocab_limit = draw(st.integers(-1, VOCAB + 1) | INT32)
    elif hostile == "session":
        request.session_id = draw(session_ids())
    elif hostile == "resume":
        request.session_id = draw(st.just("") | session_ids())
        request.resume_from = draw(st.integers(1, 8) | st.integers(0, 2**32 - 1))
    return request, hostile


def test_generate_and_stream(fuzzer) -> None:
    @examples(350)
    @given(gateway_requests(), st.booleans())
    def case(generated, stream) -> None:
        request, hostile = generated
        method = "GenerateStream" if stream else "Generate"
        answer = fuzzer.expect(ANY_ANSWER, "gateway", GATEWAY + method, request, streaming=stream)
        if hostile is None:
            assert answer.code is C.OK, answer.details

    case()


# (role, method, request, field path, setter): each string field a client can send
PROMPT_TEXT = ("prompt.text", lambda m, v: setattr(m.prompt, "text", v))
STRING_FIELDS = [
    ("gateway", "Gateway/Generate", gateway_pb2.GatewayGenerateRequest, *PROMPT_TEXT),
    ("gateway", "Gateway/GenerateStream", gateway_pb2.GatewayGenerateRequest, *PROMPT_TEXT),
    (
        "gateway",
        "Gateway/Generate",
        gateway_pb2.GatewayGenerateRequest,
        "model",
        lambda m, v: setattr(m, "model", v),
    ),
    (
        "gateway",
        "Gateway/Generate",
        gateway_pb2.GatewayGenerateRequest,
        "session_id",
        lambda m, v: setattr(m, "session_id", v),
    ),
    (
        "gateway",
        "Gateway/Generate",
        gateway_pb2.GatewayGenerateRequest,
        "prompt.chat.messages.content",
        lambda m, v: m.prompt.chat.messages.add(role="user", content=v),
    ),
    (
        "gateway",
        "Gateway/GenerateStream",
        gateway_pb2.GatewayGenerateRequest,
        "sampling.stop",
        lambda m, v: (setattr(m.prompt, "text", "hi"), m.sampling.stop.append(v)),
    ),
    ("target", "TargetService/Generate", target_pb2.GenerateRequest, *PROMPT_TEXT),
    (
        "target",
        "TargetService/Score",
        target_pb2.ScoreRequest,
        "input.chat.messages.role",
        lambda m, v: m.input.chat.messages.add(role=v, content="hi"),
    ),
    (
        "target",
        "TargetService/Prefill",
        target_pb2.PrefillRequest,
        "session.session_id",
        lambda m, v: setattr(m.session, "session_id", v),
    ),
    (
        "target",
        "TargetService/Release",
        common_pb2.ReleaseRequest,
        "session_id",
        lambda m, v: setattr(m, "session_id", v),
    ),
    (
        "draft",
        "DraftService/Propose",
        draft_pb2.ProposeRequest,
        "session.session_id",
        lambda m, v: setattr(m.session, "session_id", v),
    ),
    (
        "draft",
        "DraftService/Prefill",
        draft_pb2.DraftPrefillRequest,
        "model",
        lambda m, v: setattr(m, "model", v),
    ),
    (
        "scoring",
        "ScoringService/Detect",
        scoring_pb2.DetectRequest,
        "input.text",
        lambda m, v: setattr(m.input, "text", v),
    ),
    (
        "scoring",
        "ScoringService/Membership",
        scoring_pb2.MembershipRequest,
        "input.chat.messages.content",
        lambda m, v: m.input.chat.messages.add(role="user", content=v),
    ),
]

# byte strings that are not UTF-8: lone continuation bytes, truncated sequences, overlong
# encodings, encoded surrogates, code points above U+10FFFF
INVALID_UTF8 = st.sampled_from(
    [b"\x80", b"\xc3", b"\xe2\x82", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xff\xfe"]
)


@pytest.mark.parametrize(
    ("role", "method", "message", "path", "setter"),
    STRING_FIELDS,
    ids=[f"{f[1]}:{f[3]}" for f in STRING_FIELDS],
)
def test_invalid_utf8_names_the_field(fuzzer, role, method, message, path, setter) -> None:
    @examples(15)
    @given(TEXT.filter(lambda t: "\x00" not in t), INVALID_UTF8, TEXT.filter(lambda t: "\x00" not in t))
    def case(before, bad, after) -> None:
        # a marker of the right length, swapped for the invalid bytes after serializing, so the
        # length prefixes stay right and only the UTF-8 is wrong
        raw = before.encode() + bad + after.encode()
        marker = "\x00" * len(raw)
        request = message()
        setter(request, marker)
        data = request.SerializeToString()
        assert data.count(marker.encode()) == 1
        answer = fuzzer.expect(
            {C.INVALID_ARGUMENT}, role, f"/specmesh.v1.{method}", data.replace(marker.encode(), raw)
        )
        assert answer.details.startswith(path + ":"), answer.details

    case()
