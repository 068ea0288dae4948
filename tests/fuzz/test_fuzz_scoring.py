"""ScoringService under hostile requests: any prompt, unknown method values, NaN / negative /
huge k fractions, per-token flags; Attribute with any context, target text, length, replacement
share and method."""

from __future__ import annotations

import math

from fuzzing import ANY_ANSWER, FLOATS, INT32, TEXT, VOCAB, C, examples, prompts
from hypothesis import given
from hypothesis import strategies as st

from specmesh.v1 import scoring_pb2

SCORING = "/specmesh.v1.ScoringService/"


def methods(enum) -> st.SearchStrategy[list[int]]:
    return st.lists(st.sampled_from(list(enum.values())) | st.integers(-1, 12), max_size=4)


def test_detect_membership_uncertainty(fuzzer) -> None:
    @examples(200)
    @given(st.sampled_from(["Detect", "Membership", "Uncertainty"]), prompts(VOCAB), st.data())
    def case(method, prompt, data) -> None:
        if method == "Detect":
            request = scoring_pb2.DetectRequest(
                input=prompt,
                methods=data.draw(methods(scoring_pb2.DetectMethod)),
                per_token=data.draw(st.booleans()),
            )
        elif method == "Membership":
            k = data.draw(st.sampled_from([0.0, 0.2, 1.0, -0.1, 1.5, math.nan]) | FLOATS)
            request = scoring_pb2.MembershipRequest(
                input=prompt, methods=data.draw(methods(scoring_pb2.MembershipMethod)), k_fraction=k
            )
        else:
            start = data.draw(st.integers(-1, 12) | st.sampled_from([2**31 - 1, -(2**31)]))
            request = scoring_pb2.UncertaintyRequest(input=prompt, start=start)
        answer = fuzzer.expect(ANY_ANSWER, "scoring", SCORING + method, request)
        if answer.code is C.OK and method == "Detect":
            reply = scoring_pb2.DetectResponse.FromString(answer.replies[0])
            assert all(0 <= t < VOCAB for t in reply.token_ids)

    case()


def test_attribute(fuzzer) -> None:
    valid = {
        # small lengths: every valid case runs a real (tiny) attribution
        "max_new_tokens": st.integers(0, 3),
        "replace_ratio_percent": st.integers(0, 100),
        "method": st.sampled_from(list(scoring_pb2.AttributionMethod.values())),
    }
    hostile = {
        "max_new_tokens": st.sampled_from([33, -1]) | INT32,
        "replace_ratio_percent": st.sampled_from([101, -1]) | INT32,
        "method": st.integers(-1, 9),
    }

    @examples(50)
    @given(prompts(VOCAB), st.sampled_from([None, None, *valid]), st.data())
    def case(prompt, bad, data) -> None:
        # at most one hostile number per case, so that most cases reach the attribution
        numbers = {k: data.draw(hostile[k] if k == bad else v) for k, v in valid.items()}
        request = scoring_pb2.AttributeRequest(
            context=prompt,
            target_text=data.draw(st.sampled_from(["", "ab"]) | TEXT),
            seed=data.draw(st.integers(0, 2**64 - 1)),
            **numbers,
        )
        answer = fuzzer.expect(ANY_ANSWER, "scoring", SCORING + "Attribute", request)
        if answer.code is C.OK:
            reply = scoring_pb2.AttributeResponse.FromString(answer.replies[0])
            n = len(reply.context_token_ids)
            assert reply.attributions and all(len(a.importance) == n for a in reply.attributions)

    case()
