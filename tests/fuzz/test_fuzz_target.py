"""TargetService under hostile but well-formed messages: invalid token ids, cyclic and
out-of-range tree parents, NaN / negative / unnormalised draft distributions, wrong tensors,
huge counts, unknown sessions and lengths. Every answer is OK or a refusal naming the problem,
and a refused call leaves its session exactly as it was."""

from __future__ import annotations

from fuzzing import (
    ANY_ANSWER,
    INT32,
    VOCAB,
    C,
    Sessions,
    examples,
    prompts,
    random_stream,
    sampling,
    session_ids,
    token_ids,
    trees,
)
from hypothesis import given
from hypothesis import strategies as st

from specmesh.v1 import common_pb2, target_pb2, target_pb2_grpc

SERVICE = "/specmesh.v1.TargetService/"
RULES = st.sampled_from(list(common_pb2.AcceptanceRule.values())) | st.integers(-2, 9)


def lengths(n: int) -> st.SearchStrategy[int]:
    """Mostly the right expected_length, sometimes a wrong or hostile one."""
    return st.just(n) | st.sampled_from([0, n + 1, n - 1, -1, 2**31 - 1]) | INT32


def test_vocab_matches_the_stack(stack) -> None:
    assert stack.vocab_size == VOCAB


def test_verify(fuzzer) -> None:
    sessions = Sessions("verify")
    stub = target_pb2_grpc.TargetServiceStub(fuzzer.stack.channel("target"))

    @examples(200)
    @given(
        token_ids(VOCAB),
        st.data(),
        trees(VOCAB),
        sampling(),
        RULES,
        random_stream(),
        st.booleans(),
        st.booleans(),
    )
    def case(new, data, tree, params, rule, random, hidden, fresh) -> None:
        sid = sessions.fresh() if fresh else sessions.touch(data.draw(session_ids()))
        ref = common_pb2.SessionRef(
            session_id=sid, new_tokens=new, expected_length=data.draw(lengths(len(new)))
        )
        request = target_pb2.VerifyRequest(
            session=ref, tree=tree, sampling=params, rule=rule, random=random, return_hidden_states=hidden
        )
        code, replies, _ = fuzzer.expect(ANY_ANSWER, "target", SERVICE + "Verify", request)
        if code is C.OK:
            reply = target_pb2.VerifyResponse.FromString(replies[0])
            path = list(reply.accepted_nodes)
            assert all(tree.parents[b] == a for a, b in zip([-1, *path], path, strict=False))
            assert 0 <= reply.next_token < VOCAB
        sessions.release_all(stub)

    case()


def test_refused_calls_leave_the_session_as_it_was(fuzzer) -> None:
    """A session with a prompt gets a hostile Verify / Extend / Prefill; when refused, it still
    holds exactly its prompt (a Prefill with no new tokens and the old length succeeds)."""
    sessions = Sessions("rollback")
    stub = target_pb2_grpc.TargetServiceStub(fuzzer.stack.channel("target"))
    prompt = [3, 50, 60, 70]

    @examples(150)
    @given(
        st.sampled_from(["Verify", "Extend", "Prefill"]),
        token_ids(VOCAB),
        st.data(),
        trees(VOCAB),
        sampling(),
        RULES,
    )
    def case(method, new, data, tree, params, rule) -> None:
        sid = sessions.fresh()
        start = common_pb2.SessionRef(session_id=sid, new_tokens=prompt, expected_length=len(prompt))
        stub.Prefill(target_pb2.PrefillRequest(session=start))
        ref = common_pb2.SessionRef(
            session_id=sid, new_tokens=new, expected_length=data.draw(lengths(len(prompt) + len(new)))
        )
        if method == "Verify":
            request = target_pb2.VerifyRequest(session=ref, tree=tree, sampling=params, rule=rule)
        elif method == "Extend":
            request = target_pb2.ExtendRequest(session=ref, sampling=params)
        else:
            request = target_pb2.PrefillRequest(session=ref)
        code, _, _ = fuzzer.expect(ANY_ANSWER, "target", SERVICE + method, request)
        if code is not C.OK:
            same = common_pb2.SessionRef(session_id=sid, expected_length=len(prompt))
            assert stub.Prefill(target_pb2.PrefillRequest(session=same)).session_length == len(prompt)
        sessions.release_all(stub)

    case()


def test_prefill_extend_release(fuzzer) -> None:
    sessions = Sessions("extend")
    stub = target_pb2_grpc.TargetServiceStub(fuzzer.stack.channel("target"))

    @examples(200)
    @given(
        st.sampled_from(["Prefill", "Extend", "Release"]),
        token_ids(VOCAB, 40),
        st.data(),
        sampling(),
        random_stream(),
    )
    def case(method, new, data, params, random) -> None:
        sid = sessions.touch(data.draw(session_ids() | st.just(sessions.fresh())))
        ref = common_pb2.SessionRef(
            session_id=sid, new_tokens=new, expected_length=data.draw(lengths(len(new)))
        )
        if method == "Prefill":
            request = target_pb2.PrefillRequest(
                session=ref, model=data.draw(st.sampled_from(["", "tiny", "nope"]))
            )
        elif method == "Extend":
            request = target_pb2.ExtendRequest(session=ref, sampling=params, random=random)
        else:
            request = common_pb2.ReleaseRequest(session_id=sid)
        fuzzer.expect(ANY_ANSWER, "target", SERVICE + method, request)
        sessions.release_all(stub)

    case()


def test_score_and_generate(fuzzer) -> None:
    sessions = Sessions("generate")
    stub = target_pb2_grpc.TargetServiceStub(fuzzer.stack.channel("target"))

    @examples(200)
    @given(
        st.booleans(),
        prompts(VOCAB),
        sampling(),
        INT32 | st.integers(-2, 8),
        INT32 | st.integers(-1, 22),
        st.data(),
    )
    def case(score, prompt, params, start, top, data) -> None:
        if score:
            request = target_pb2.ScoreRequest(input=prompt, start=start, top_logprobs=top)
            fuzzer.expect(ANY_ANSWER, "target", SERVICE + "Score", request)
            return
        sid = data.draw(st.just("") | st.just(sessions.fresh()) | session_ids())
        request = target_pb2.GenerateRequest(prompt=prompt, sampling=params, session_id=sessions.touch(sid))
        fuzzer.expect(ANY_ANSWER, "target", SERVICE + "Generate", request, streaming=True)
        sessions.release_all(stub)

    case()
