"""The target service on real SmolLM2 weights, as a real gRPC server on loopback."""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import ServerThread

from services.runtime.errors import status_details
from services.runtime.settings import ServerSettings
from services.target.server import load_target, start_target
from specmesh.v1 import common_pb2, target_pb2, target_pb2_grpc

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def target(smollm2_dir):
    servicer = load_target(str(smollm2_dir), max_sessions=8)
    with ServerThread(lambda: start_target(servicer, ServerSettings(host="127.0.0.1", port=0))) as srv:
        channel = grpc.insecure_channel(srv.address)
        yield servicer, target_pb2_grpc.TargetServiceStub(channel), channel
        channel.close()
    servicer.close()


def chat(text: str) -> common_pb2.Prompt:
    return common_pb2.Prompt(
        chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=text)])
    )


def ids_prompt(ids: list[int]) -> common_pb2.Prompt:
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids))


def generate(stub, prompt, **sampling) -> tuple[list[int], str, target_pb2.GenerateResponse]:
    chunks = list(
        stub.Generate(
            target_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(**sampling))
        )
    )
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks[-1]


def assert_healthy(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_model_info(target) -> None:
    _, stub, _ = target
    info = stub.GetModelInfo(common_pb2.GetModelInfoRequest())
    assert (info.name, info.vocab_size, info.max_context) == (MODEL, 49152, 8192)
    assert len(info.digest) == 64 and info.parameters > 100_000_000


def test_get_tokenizer_serves_the_model_tokenizer(target, smollm2_dir) -> None:
    from services.core.tokenizer import Tokenizer, decode_sources

    _, stub, _ = target
    reply = stub.GetTokenizer(target_pb2.GetTokenizerRequest())
    assert reply.tokenizer_json == (smollm2_dir / "tokenizer.json").read_bytes()  # the file as it is
    tok, ref = (
        decode_sources(reply.tokenizer_json, reply.tokenizer_config_json, reply.sha256),
        Tokenizer.from_dir(smollm2_dir),
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.encode_chat(messages) == ref.encode_chat(messages)
    assert tok.eos_token_ids == ref.eos_token_ids
    assert stub.GetTokenizer(target_pb2.GetTokenizerRequest()) == reply


def test_greedy_chat_answers_paris(target) -> None:
    _, stub, _ = target
    ids, text, last = generate(stub, chat("What is the capital of France?"), max_new_tokens=48)
    assert "Paris" in text
    assert last.finish_reason == common_pb2.FINISH_REASON_EOS
    assert last.usage.output_tokens == len(ids) and last.usage.prompt_tokens > 10


def test_greedy_stream_equals_in_process_greedy(target) -> None:
    servicer, stub, _ = target
    prompt = servicer.tokenizer.encode("def fibonacci(n):\n")
    ids, _, last = generate(stub, ids_prompt(prompt), max_new_tokens=20, ignore_eos=True)
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH and len(ids) == 20
    engine, seq = servicer.engine, servicer.engine.new_sequence()
    expected, logits = [], engine.prefill(seq, prompt)
    for _ in range(20):
        expected.append(int(logits.argmax()))
        logits = engine.decode(seq, expected[-1])
    seq.release()
    assert ids == expected


def test_seeded_sampling_is_reproducible(target) -> None:
    _, stub, _ = target
    kw = dict(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_new_tokens=16, ignore_eos=True)
    a, _, la = generate(stub, chat("Tell me a story."), **kw)
    b, _, lb = generate(stub, chat("Tell me a story."), **kw)
    assert a == b and la.usage.seed == 1234


def test_stop_string_ends_and_is_removed(target) -> None:
    _, stub, _ = target
    _, text, last = generate(stub, chat("What is the capital of France?"), max_new_tokens=48, stop=["Paris"])
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP_STRING
    assert "Paris" not in text


def test_score_matches_engine_logprobs(target) -> None:
    servicer, stub, _ = target
    ids = servicer.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    resp = stub.Score(target_pb2.ScoreRequest(input=ids_prompt(ids), top_logprobs=3))
    assert list(resp.token_ids) == ids and len(resp.scores) == len(ids) - 1
    seq = servicer.engine.new_sequence()
    logp = servicer.engine.extend(seq, ids).log_softmax(-1)
    seq.release()
    for i, s in enumerate(resp.scores):
        assert s.token_id == ids[i + 1]
        assert abs(s.logprob - float(logp[i, ids[i + 1]])) < 1e-4
        assert s.rank >= 1 and len(s.top_ids) == 3 and s.top_logprobs[0] >= s.logprob - 1e-6
    assert abs(resp.total_logprob - sum(s.logprob for s in resp.scores)) < 1e-3


def test_session_prefill_extend_release(target) -> None:
    servicer, stub, channel = target
    tok = servicer.tokenizer
    first = tok.encode("The capital of France is")
    sid = "sess-1"
    r = stub.Prefill(
        target_pb2.PrefillRequest(
            session=common_pb2.SessionRef(session_id=sid, new_tokens=first, expected_length=len(first))
        )
    )
    assert r.session_length == len(first)
    # A wrong expected_length is refused and leaves the session as it was.
    with pytest.raises(grpc.RpcError) as e:
        stub.Extend(
            target_pb2.ExtendRequest(
                session=common_pb2.SessionRef(session_id=sid, new_tokens=[5], expected_length=len(first) + 7)
            )
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert status_details(e.value)[2][0].field == "session.expected_length"
    more = tok.encode(" Paris")
    ext = stub.Extend(
        target_pb2.ExtendRequest(
            session=common_pb2.SessionRef(
                session_id=sid, new_tokens=more, expected_length=len(first) + len(more)
            )
        )
    )
    assert ext.session_length == len(first) + len(more)
    seq = servicer.engine.new_sequence()
    expected = int(servicer.engine.prefill(seq, first + more).argmax())
    seq.release()
    assert ext.next_token == expected
    assert stub.Release(common_pb2.ReleaseRequest(session_id=sid)).released
    assert not stub.Release(common_pb2.ReleaseRequest(session_id=sid)).released
    assert_healthy(channel)


def test_sessions_with_a_common_prefix_share_its_kv_blocks(target) -> None:
    """The second session's Prefill adopts the first one's full blocks (cached_tokens) and
    both continue as a session computed from scratch would."""
    servicer, stub, _ = target
    prompt = servicer.tokenizer.encode("A long shared system prompt about the history of Paris. " * 3)
    assert len(prompt) > 2 * servicer.engine.pool.block_size
    replies = []
    for sid in ("share-a", "share-b"):
        ref = common_pb2.SessionRef(session_id=sid, new_tokens=prompt, expected_length=len(prompt))
        replies.append(stub.Prefill(target_pb2.PrefillRequest(session=ref)))
    bs = servicer.engine.pool.block_size
    assert [r.cached_tokens for r in replies] == [0, (len(prompt) - 1) // bs * bs]
    a, b = (servicer.sessions.get(sid).seq for sid in ("share-a", "share-b"))
    shared = (len(prompt) - 1) // bs
    assert a.blocks[:shared] == b.blocks[:shared]
    seq = servicer.engine.new_sequence()
    expected = int(servicer.engine.prefill(seq, prompt + [5]).argmax())
    seq.release()
    for sid in ("share-a", "share-b"):
        ref = common_pb2.SessionRef(session_id=sid, new_tokens=[5], expected_length=len(prompt) + 1)
        assert stub.Extend(target_pb2.ExtendRequest(session=ref)).next_token == expected
        assert stub.Release(common_pb2.ReleaseRequest(session_id=sid)).released


def test_generate_keeps_a_session_for_the_next_turn(target) -> None:
    servicer, stub, _ = target
    prompt = servicer.tokenizer.encode("One, two, three,")
    req = target_pb2.GenerateRequest(
        prompt=ids_prompt(prompt),
        session_id="turns",
        sampling=common_pb2.SamplingParams(max_new_tokens=5, ignore_eos=True),
    )
    out = [t for c in stub.Generate(req) for t in c.token_ids]
    session = servicer.sessions.get("turns")
    assert session.tokens == prompt + out and session.seq.length == len(prompt) + len(out)
    stub.Release(common_pb2.ReleaseRequest(session_id="turns"))


def test_generate_under_a_kv_budget(target) -> None:
    """A budget the sequence fits in is the full cache (greedy output equal); a tight one is
    H2O's decode of the same prompt in process, and holds no KV of the pool afterwards."""
    from services.core.generation import generate_with_kv_budget
    from services.core.params import KVBudget
    from services.runtime.protocol import generation_params

    servicer, stub, _ = target
    prompt = servicer.tokenizer.encode(
        "Mount Everest, at 8,849 metres, was first climbed in 1953 by Tenzing Norgay and Edmund "
        "Hillary, after earlier British attempts in the 1920s had failed high on the north ridge. "
        "Name the two climbers and the year, then say which ridge the 1920s attempts used:"
    )
    sampling = common_pb2.SamplingParams(max_new_tokens=12, ignore_eos=True)

    def served(budget: common_pb2.KVBudget | None) -> list[int]:
        req = target_pb2.GenerateRequest(prompt=ids_prompt(prompt), sampling=sampling, kv_budget=budget)
        return [t for c in stub.Generate(req) for t in c.token_ids]

    full = served(None)
    free = servicer.engine.pool.free_blocks
    assert served(common_pb2.KVBudget(max_tokens=len(prompt) + 12)) == full
    tight = served(common_pb2.KVBudget(max_tokens=16, recent_share=0.5))
    assert servicer.engine.pool.free_blocks == free  # its KV was its own
    steps = generate_with_kv_budget(
        servicer.engine, servicer.tokenizer, prompt, generation_params(sampling), KVBudget(16, 0.5)
    )
    assert tight == [t for s in steps for t in s.token_ids]
    assert len(tight) == 12 and tight != full  # 16 of ~80 keys: the decode is H2O's, not the full one


BAD_GENERATE = [
    ("empty prompt", dict(prompt=common_pb2.Prompt()), "INVALID_ARGUMENT", "prompt"),
    ("empty text", dict(prompt=common_pb2.Prompt(text="")), "INVALID_ARGUMENT", "prompt.text"),
    ("id >= vocab", dict(prompt=ids_prompt([1, 49152])), "OUT_OF_RANGE", "prompt.token_ids.ids"),
    ("negative id", dict(prompt=ids_prompt([-3])), "OUT_OF_RANGE", "prompt.token_ids.ids"),
    (
        "max_new_tokens 0",
        dict(sampling=dict(max_new_tokens=0)),
        "INVALID_ARGUMENT",
        "sampling.max_new_tokens",
    ),
    (
        "max_new_tokens negative",
        dict(sampling=dict(max_new_tokens=-5)),
        "INVALID_ARGUMENT",
        "sampling.max_new_tokens",
    ),
    (
        "max_new_tokens huge",
        dict(sampling=dict(max_new_tokens=10**6)),
        "OUT_OF_RANGE",
        "sampling.max_new_tokens",
    ),
    ("unknown model", dict(model="gpt-17"), "INVALID_ARGUMENT", "model"),
    (
        "kv budget too small",
        dict(kv_budget=common_pb2.KVBudget(max_tokens=4)),
        "INVALID_ARGUMENT",
        "kv_budget.max_tokens",
    ),
    (
        "kv budget recent share > 1",
        dict(kv_budget=common_pb2.KVBudget(max_tokens=64, recent_share=1.5)),
        "INVALID_ARGUMENT",
        "kv_budget.recent_share",
    ),
    (
        "kv budget with a session",
        dict(kv_budget=common_pb2.KVBudget(max_tokens=64), session_id="kept"),
        "INVALID_ARGUMENT",
        "kv_budget",
    ),
    (
        "negative temperature",
        dict(sampling=dict(temperature=-1, max_new_tokens=4)),
        "INVALID_ARGUMENT",
        "sampling.temperature",
    ),
    ("top_p > 1", dict(sampling=dict(top_p=1.5, max_new_tokens=4)), "INVALID_ARGUMENT", "sampling.top_p"),
    (
        "bad role",
        dict(
            prompt=common_pb2.Prompt(
                chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="wizard", content="hi")])
            )
        ),
        "INVALID_ARGUMENT",
        "prompt.chat.messages",
    ),
]


@pytest.mark.parametrize("name,fields,code,field", BAD_GENERATE, ids=[b[0] for b in BAD_GENERATE])
def test_generate_bad_input(target, name, fields, code, field) -> None:
    _, stub, channel = target
    sampling = (
        fields.pop("sampling", dict(max_new_tokens=4)) if "sampling" in fields else dict(max_new_tokens=4)
    )
    req = target_pb2.GenerateRequest(
        prompt=fields.pop("prompt", ids_prompt([1, 2, 3])),
        sampling=common_pb2.SamplingParams(**sampling),
        **fields,
    )
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req))
    got_code, message, violations = status_details(e.value)
    assert got_code.name == code, message
    assert [v.field for v in violations] == [field]
    assert field in message
    assert_healthy(channel)


def test_bad_input_to_score_prefill_extend_release(target) -> None:
    servicer, stub, channel = target
    cases = [
        (lambda: stub.Score(target_pb2.ScoreRequest(input=common_pb2.Prompt())), "INVALID_ARGUMENT", "input"),
        (
            lambda: stub.Score(target_pb2.ScoreRequest(input=ids_prompt([1, 99999]))),
            "OUT_OF_RANGE",
            "input.token_ids.ids",
        ),
        (
            lambda: stub.Score(target_pb2.ScoreRequest(input=ids_prompt([1, 2]), start=5)),
            "OUT_OF_RANGE",
            "start",
        ),
        (
            lambda: stub.Score(target_pb2.ScoreRequest(model="nope", input=ids_prompt([1, 2]))),
            "INVALID_ARGUMENT",
            "model",
        ),
        (
            lambda: stub.Prefill(
                target_pb2.PrefillRequest(
                    session=common_pb2.SessionRef(session_id="", new_tokens=[1], expected_length=1)
                )
            ),
            "INVALID_ARGUMENT",
            "session.session_id",
        ),
        (
            lambda: stub.Prefill(
                target_pb2.PrefillRequest(
                    session=common_pb2.SessionRef(session_id="x", new_tokens=[1, 50000], expected_length=2)
                )
            ),
            "OUT_OF_RANGE",
            "session.new_tokens",
        ),
        (
            lambda: stub.Prefill(
                target_pb2.PrefillRequest(
                    session=common_pb2.SessionRef(session_id="x", new_tokens=[1] * 9000, expected_length=9000)
                )
            ),
            "OUT_OF_RANGE",
            "session.new_tokens",
        ),
        (
            lambda: stub.Extend(
                target_pb2.ExtendRequest(
                    session=common_pb2.SessionRef(session_id="y", new_tokens=[1], expected_length=1),
                    sampling=common_pb2.SamplingParams(top_k=-1),
                )
            ),
            "INVALID_ARGUMENT",
            "sampling.top_k",
        ),
        (lambda: stub.Release(common_pb2.ReleaseRequest(session_id="")), "INVALID_ARGUMENT", "session_id"),
    ]
    for call, code, field in cases:
        with pytest.raises(grpc.RpcError) as e:
            call()
        got, message, violations = status_details(e.value)
        assert (got.name, [v.field for v in violations]) == (code, [field]), message
    assert "x" not in servicer.sessions and "y" not in servicer.sessions
    assert_healthy(channel)


def test_engine_state_is_clean_after_errors(target) -> None:
    servicer, _, _ = target
    # Every failed or finished stateless call returned its KV blocks (sessions may share some).
    held = {b for k in list(servicer.sessions._sessions) for b in servicer.sessions.get(k).seq.blocks}
    assert servicer.engine.pool.free_blocks == servicer.engine.pool.max_blocks - len(held)
    assert torch.get_num_threads() >= 1


def test_tiny_temperature_samples_the_greedy_limit(target) -> None:
    """temperature 1e-45 (a float32 denormal on the wire) is sampling in the T -> 0 limit: the
    argmax, with no NaN and no INTERNAL error, in Generate and in Extend."""
    servicer, stub, _ = target
    prompt = servicer.tokenizer.encode("def fibonacci(n):\n")
    greedy, _, _ = generate(stub, ids_prompt(prompt), max_new_tokens=8, ignore_eos=True)
    tiny, _, last = generate(
        stub, ids_prompt(prompt), max_new_tokens=8, ignore_eos=True, temperature=1e-45, seed=7
    )
    assert tiny == greedy and last.usage.seed == 7
    ext = stub.Extend(
        target_pb2.ExtendRequest(
            session=common_pb2.SessionRef(
                session_id="tiny-t", new_tokens=prompt, expected_length=len(prompt)
            ),
            sampling=common_pb2.SamplingParams(temperature=1e-45),
            random=common_pb2.RandomStream(seed=1, counter=0),
        )
    )
    assert ext.next_token == greedy[0] and ext.next_logprob <= 0
    assert stub.Release(common_pb2.ReleaseRequest(session_id="tiny-t")).released


def test_a_failed_generate_leaves_no_new_session(target) -> None:
    """A Generate that opened a new session and did not finish (here: the client cancels the
    stream) releases it again, so the id reads as unknown afterwards, not as an empty session."""
    servicer, stub, _ = target
    req = target_pb2.GenerateRequest(
        prompt=ids_prompt(servicer.tokenizer.encode("Count to one hundred:")),
        session_id="gen-cancelled",
        sampling=common_pb2.SamplingParams(max_new_tokens=200, ignore_eos=True),
    )
    stream = stub.Generate(req)
    assert next(stream).token_ids
    stream.cancel()
    deadline = time.monotonic() + 30
    while "gen-cancelled" in servicer.sessions:
        assert time.monotonic() < deadline, "the cancelled call's session stayed open"
        time.sleep(0.05)
    assert not stub.Release(common_pb2.ReleaseRequest(session_id="gen-cancelled")).released
    # refused input with a new session id: refused before the session is opened
    prompt = [1, 2, 3]
    with pytest.raises(grpc.RpcError) as e:
        list(
            stub.Generate(
                target_pb2.GenerateRequest(
                    prompt=ids_prompt(prompt),
                    session_id="gen-refused",
                    sampling=common_pb2.SamplingParams(max_new_tokens=10**6),
                )
            )
        )
    assert status_details(e.value)[2][0].field == "sampling.max_new_tokens"
    assert not stub.Release(common_pb2.ReleaseRequest(session_id="gen-refused")).released
