"""Speculative rounds as an internal client runs them, then broken: the draft service proposes a
real tree for a fresh session (any strategy, budget, sampling), one field of it (or of the
VerifyRequest) is made hostile, and the target verifies it. Also the DraftService's own RPCs
under hostile budgets, strategies, vocab limits and sessions."""

from __future__ import annotations

import math

from fuzzing import (
    ANY_ANSWER,
    INT32,
    VOCAB,
    C,
    Sessions,
    budgets,
    examples,
    sampling,
    session_ids,
    token_ids,
    trees,
)
from hypothesis import given
from hypothesis import strategies as st

from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc

DRAFT, TARGET = "/specmesh.v1.DraftService/", "/specmesh.v1.TargetService/"
STRATEGIES = st.sampled_from(list(common_pb2.DraftStrategy.values()))
HOSTILE = [-1, VOCAB, 2**31 - 1, -(2**31)]
BAD_FLOATS = [math.nan, -0.5, 2.0, math.inf, -math.inf, 1e30]
MUTATIONS = [
    "none", "token", "parent", "prob", "prob_id", "drop_expanded", "duplicate_expanded", "rule",
    "logprob", "lookup", "truncate", "temperature", "new_tokens", "length", "hidden", "random_tree",
]  # fmt: skip


def mutate(tree: common_pb2.TokenTree, request: target_pb2.VerifyRequest, how: str, draw) -> None:
    """Make one thing about a real round wrong (in place)."""
    n = len(tree.tokens)
    pick = draw(st.integers(0, max(n - 1, 0)))
    if how == "token" and n:
        tree.tokens[pick] = draw(st.sampled_from(HOSTILE))
    elif how == "parent" and n:
        tree.parents[pick] = draw(st.integers(-3, n + 2) | st.sampled_from(HOSTILE))  # self, forward, cycle
    elif how in ("prob", "prob_id") and tree.expanded:
        sparse = tree.expanded[pick % len(tree.expanded)].distribution.sparse
        if sparse.probs:
            i = draw(st.integers(0, len(sparse.probs) - 1))
            if how == "prob":
                sparse.probs[i] = draw(st.sampled_from(BAD_FLOATS))
            else:
                sparse.ids[i] = draw(st.sampled_from(HOSTILE) | st.sampled_from(list(sparse.ids)))
    elif how == "drop_expanded" and tree.expanded:
        del tree.expanded[pick % len(tree.expanded)]
    elif how == "duplicate_expanded" and tree.expanded:
        tree.expanded.add().CopyFrom(tree.expanded[0])
    elif how == "rule":
        request.rule = draw(st.integers(-2, 9))
    elif how == "logprob" and n:
        tree.draft_logprobs[:] = [0.0] * n if not tree.draft_logprobs else tree.draft_logprobs
        tree.draft_logprobs[pick] = draw(st.sampled_from([math.nan, 0.5, math.inf, -math.inf]))
    elif how == "lookup":
        tree.lookup_nodes.append(draw(st.integers(-2, n + 1)))
    elif how == "truncate" and n:
        del tree.parents[pick:]
    elif how == "temperature":
        request.sampling.temperature = draw(st.sampled_from([0.0, 0.5, 1.5, *BAD_FLOATS]))
    elif how == "new_tokens":
        request.session.new_tokens.append(draw(st.sampled_from(HOSTILE)))
    elif how == "length":
        request.session.expected_length += draw(st.sampled_from([-1, 1, 2**30]))
    elif how == "hidden":
        request.return_hidden_states = True
    elif how == "random_tree":
        tree.CopyFrom(draw(trees(VOCAB)))


def test_proposed_tree_verified_after_one_mutation(fuzzer) -> None:
    sessions = Sessions("round")
    target = target_pb2_grpc.TargetServiceStub(fuzzer.stack.channel("target"))
    draft = draft_pb2_grpc.DraftServiceStub(fuzzer.stack.channel("draft"))

    @examples(350)
    @given(
        st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=20),
        STRATEGIES,
        budgets(),
        st.sampled_from([0.0, 0.0, 0.8, 1.3]),
        st.integers(0, 50),
        st.integers(0, 2**64 - 1),
        st.sampled_from(MUTATIONS),
        st.data(),
    )
    def case(prompt, strategy, budget, temperature, top_k, seed, how, data) -> None:
        sid = sessions.fresh()
        ref = common_pb2.SessionRef(session_id=sid, new_tokens=prompt, expected_length=len(prompt))
        params = common_pb2.SamplingParams(temperature=temperature, top_k=top_k)
        random = common_pb2.RandomStream(seed=seed)
        propose = draft_pb2.ProposeRequest(
            session=ref, strategy=strategy, budget=budget, sampling=params, random=random
        )
        code, replies, _ = fuzzer.expect(ANY_ANSWER, "draft", DRAFT + "Propose", propose)
        if code is C.OK:
            proposed = draft_pb2.ProposeResponse.FromString(replies[0])
            assert proposed.session_length == len(prompt)
            verify = target_pb2.VerifyRequest(
                session=ref, tree=proposed.tree, sampling=params, rule=proposed.rule, random=random
            )
            mutate(verify.tree, verify, how, data.draw)
            code, replies, _ = fuzzer.expect(ANY_ANSWER, "target", TARGET + "Verify", verify)
            if how == "none":  # an untouched round from a real draft is always verified
                assert code is C.OK
        sessions.release_all(target, draft)

    case()


def test_draft_rpcs(fuzzer) -> None:
    sessions = Sessions("draft")
    draft = draft_pb2_grpc.DraftServiceStub(fuzzer.stack.channel("draft"))

    @examples(250)
    @given(
        st.sampled_from(["Propose", "Propose", "Prefill", "Release", "GetModelInfo"]),
        token_ids(VOCAB, 30),
        st.data(),
        STRATEGIES | st.integers(-2, 9),
        budgets(),
        sampling(),
        INT32 | st.integers(-1, VOCAB + 1),
        st.booleans(),
    )
    def case(method, new, data, strategy, budget, params, vocab_limit, route) -> None:
        sid = sessions.touch(data.draw(st.just(sessions.fresh()) | session_ids()))
        length = data.draw(st.just(len(new)) | INT32)
        ref = common_pb2.SessionRef(session_id=sid, new_tokens=new, expected_length=length)
        model = data.draw(st.sampled_from(["", "", "tiny", "nope"]))
        if method == "Propose":
            request = draft_pb2.ProposeRequest(
                model=model,
                session=ref,
                strategy=strategy,
                budget=budget,
                sampling=params,
                vocab_limit=vocab_limit,
                route=route,
            )
            if data.draw(st.integers(0, 9)) == 0:
                request.target_hidden_states.dtype = "float16"
        elif method == "Prefill":
            request = draft_pb2.DraftPrefillRequest(model=model, session=ref)
        elif method == "Release":
            request = common_pb2.ReleaseRequest(session_id=sid)
        else:
            request = common_pb2.GetModelInfoRequest()
        fuzzer.expect(ANY_ANSWER, "draft", DRAFT + method, request)
        sessions.release_all(draft)

    case()
