"""The ScoringService on tiny random-weight models (imported from synthetic GGUFs through the real
loading path), as a real gRPC server on loopback: every RPC, batching of concurrent calls, and
bad input answered with the right status naming the field while the server stays healthy."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import ServerThread

from services.core.engine import Engine
from services.core.scoring.reference import count_tokens, save_counts, vocab_digest
from services.core.tokenizer import Tokenizer
from services.runtime.errors import status_details
from services.runtime.settings import ServerSettings
from services.scoring.server import load_scoring, start_scoring
from specmesh.v1 import common_pb2, scoring_pb2, scoring_pb2_grpc

S = scoring_pb2
TEXT = "the winter in the north is long, and the wind in the trees is a thin, high voice."


@pytest.fixture(scope="module")
def models(tiny_gguf, tmp_path_factory):
    from services.core import model_import as mi

    root = tmp_path_factory.mktemp("scoring-models")
    target = mi.import_gguf(tiny_gguf().path, "tiny", root=root, progress=False, license="apache-2.0")
    observer = mi.import_gguf(tiny_gguf(untied=True).path, "tiny-obs", root=root, progress=False)
    tok = Tokenizer.from_dir(target)
    table = root / "tiny.token_counts.npy"
    save_counts(
        table, count_tokens([TEXT * 3], tok, tok.vocab_size), {"tokenizer_vocab_sha256": vocab_digest(tok)}
    )
    return target, observer, table


@pytest.fixture(scope="module")
def scoring(models):
    target, observer, table = models
    servicer = load_scoring(str(target), observer=str(observer), reference=str(table), pack_weights=False)
    servicer.batcher.window_s = 0.05  # wide enough that the concurrent calls below meet
    with ServerThread(lambda: start_scoring(servicer, ServerSettings(host="127.0.0.1", port=0))) as srv:
        channel = grpc.insecure_channel(srv.address)
        yield servicer, scoring_pb2_grpc.ScoringServiceStub(channel), channel
        channel.close()
    servicer.close()


def text(t: str) -> common_pb2.Prompt:
    return common_pb2.Prompt(text=t)


def ids(i: list[int]) -> common_pb2.Prompt:
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=i))


def refused(call, request) -> tuple[grpc.StatusCode, list[str]]:
    with pytest.raises(grpc.RpcError) as e:
        call(request)
    code, _, violations = status_details(e.value)
    return code, [v.field for v in violations]


def assert_healthy(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def direct_logprobs(model_dir, token_ids: list[int], start: int) -> torch.Tensor:
    engine = Engine.from_dir(model_dir)
    seq = engine.new_sequence()
    logits = engine.extend(seq, [start] + token_ids[:-1])
    return logits.log_softmax(-1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0]


def test_detect_all_methods(scoring, models) -> None:
    servicer, stub, _ = scoring
    reply = stub.Detect(S.DetectRequest(input=text(TEXT), per_token=True))
    n = len(reply.token_ids)
    assert reply.token_ids == servicer.tokenizer.encode(TEXT) and n > 10
    got = {s.method: s for s in reply.scores}
    assert sorted(got) == [1, 2, 3, 4, 5]  # every method but PAWN, the observer being loaded
    assert all(len(s.per_token) == n and math.isfinite(s.score) for s in got.values())
    want = direct_logprobs(models[0], list(reply.token_ids), servicer.start_token)
    ll = got[S.DETECT_METHOD_LOG_LIKELIHOOD]
    assert ll.score == pytest.approx(want.double().mean().item(), abs=1e-5) and ll.higher_means_machine
    assert list(ll.per_token) == pytest.approx(want.tolist(), abs=1e-5)
    b = got[S.DETECT_METHOD_BINOCULARS]
    assert b.score == pytest.approx(sum(b.per_token) / n, rel=1e-5) and not b.higher_means_machine
    f = got[S.DETECT_METHOD_FAST_DETECTGPT]
    assert f.score == pytest.approx(sum(f.per_token), rel=1e-4)
    one = stub.Detect(S.DetectRequest(input=text(TEXT), methods=[S.DETECT_METHOD_LOG_RANK]))
    assert [s.method for s in one.scores] == [S.DETECT_METHOD_LOG_RANK]
    assert one.scores[0].score == pytest.approx(got[S.DETECT_METHOD_LOG_RANK].score)
    assert not one.scores[0].per_token and one.timing.total_ns >= one.timing.forward_ns > 0


def test_membership_and_uncertainty(scoring) -> None:
    _, stub, _ = scoring
    m = stub.Membership(S.MembershipRequest(input=text(TEXT)))
    assert [s.method for s in m.scores] == [1, 2, 3] and all(math.isfinite(s.score) for s in m.scores)
    k_all = stub.Membership(S.MembershipRequest(input=text(TEXT), methods=[1], k_fraction=1.0))
    detect = stub.Detect(S.DetectRequest(input=text(TEXT), methods=[S.DETECT_METHOD_LOG_LIKELIHOOD]))
    assert k_all.scores[0].score == pytest.approx(detect.scores[0].score, abs=1e-6)  # k = 100%: the mean
    assert m.scores[0].score < k_all.scores[0].score  # the lowest 20% sit below the mean

    u = stub.Uncertainty(S.UncertaintyRequest(input=text(TEXT), start=3))
    n = len(detect.token_ids)
    assert list(u.token_ids) == list(detect.token_ids)[3:]
    assert len(u.entropy) == len(u.logprob) == len(u.kurtosis) == n - 3
    assert u.geometric_mean_prob == pytest.approx(math.exp(sum(u.logprob) / len(u.logprob)), rel=1e-5)
    assert u.arithmetic_mean_prob >= u.geometric_mean_prob  # AM-GM
    assert u.mean_entropy == pytest.approx(sum(u.entropy) / len(u.entropy), rel=1e-5)


def test_one_token_and_full_context(scoring) -> None:
    servicer, stub, _ = scoring
    ctx = servicer.engine.max_context
    one = stub.Detect(S.DetectRequest(input=ids([42]), per_token=True))
    assert list(one.token_ids) == [42] and all(len(s.per_token) == 1 for s in one.scores)
    full = stub.Detect(S.DetectRequest(input=ids([7 + i % 200 for i in range(ctx)])))
    assert len(full.token_ids) == ctx and all(math.isfinite(s.score) for s in full.scores)
    assert stub.Uncertainty(S.UncertaintyRequest(input=ids([42]))).token_ids == [42]
    assert len(stub.Membership(S.MembershipRequest(input=ids([42]))).scores) == 3


def test_concurrent_calls_share_forwards(scoring) -> None:
    servicer, stub, _ = scoring
    prompts = [text(TEXT[: 20 + 9 * i]) for i in range(6)]
    alone = [stub.Detect(S.DetectRequest(input=p)) for p in prompts]
    before = len(servicer.batcher.batch_sizes)
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: stub.Detect(S.DetectRequest(input=p)), prompts))
    sizes = servicer.batcher.batch_sizes[before:]
    assert sum(sizes) == 6 and max(sizes) > 1, sizes
    for a, t in zip(alone, together, strict=True):
        assert [s.score for s in t.scores] == pytest.approx([s.score for s in a.scores], rel=1e-4, abs=1e-5)


def test_bad_input_names_the_field(scoring) -> None:
    servicer, stub, channel = scoring
    ctx = servicer.engine.max_context
    INVALID, RANGE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE
    assert refused(stub.Detect, S.DetectRequest(input=text(""))) == (INVALID, ["input.text"])
    assert refused(stub.Detect, S.DetectRequest()) == (INVALID, ["input"])
    assert refused(stub.Detect, S.DetectRequest(input=ids([]))) == (INVALID, ["input.token_ids.ids"])
    assert refused(stub.Detect, S.DetectRequest(input=ids([1] * (ctx + 1)))) == (INVALID, ["input"])
    assert refused(stub.Detect, S.DetectRequest(input=ids([1, 10**6]))) == (RANGE, ["input.token_ids.ids"])
    assert refused(stub.Detect, S.DetectRequest(input=text("a"), methods=[99])) == (INVALID, ["methods"])
    pawn = S.DetectRequest(input=text("a"), methods=[S.DETECT_METHOD_PAWN])
    assert refused(stub.Detect, pawn) == (grpc.StatusCode.FAILED_PRECONDITION, ["methods"])
    for k in (1.5, -0.1, float("nan")):
        bad_k = S.MembershipRequest(input=text("a b"), k_fraction=k)
        assert refused(stub.Membership, bad_k) == (INVALID, ["k_fraction"])
    assert refused(stub.Membership, S.MembershipRequest(input=text("a"), methods=[7])) == (
        INVALID,
        ["methods"],
    )
    for start in (-1, 2):
        assert refused(stub.Uncertainty, S.UncertaintyRequest(input=ids([5, 6]), start=start)) == (
            RANGE,
            ["start"],
        )
    # invalid UTF-8 can only come from a raw client: Python protobuf refuses to build it
    raw = channel.unary_unary("/specmesh.v1.ScoringService/Detect")
    good = S.DetectRequest(input=text("ab")).SerializeToString()
    with pytest.raises(grpc.RpcError) as e:
        raw(good.replace(b"ab", b"\xff\xfe"))
    code, _, violations = status_details(e.value)
    assert (code, [v.field for v in violations]) == (INVALID, ["input.text"])
    chat = common_pb2.Prompt(
        chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="ab")])
    )
    with pytest.raises(grpc.RpcError) as e:
        raw(S.DetectRequest(input=chat).SerializeToString().replace(b"ab", b"a\xc0"))
    assert [v.field for v in status_details(e.value)[2]] == ["input.chat.messages.content"]
    assert_healthy(channel)
    assert stub.Detect(S.DetectRequest(input=text("still fine"))).scores


def test_attribute_every_method(scoring) -> None:
    servicer, stub, _ = scoring
    context = servicer.tokenizer.encode(TEXT)[:12]
    replies = {
        m: stub.Attribute(S.AttributeRequest(context=ids(context), max_new_tokens=3, seed=5, method=m))
        for m in (
            S.ATTRIBUTION_METHOD_UNSPECIFIED,
            S.ATTRIBUTION_METHOD_GRADIENT_X_INPUT,
            S.ATTRIBUTION_METHOD_RANDOM,
        )
    }
    reagent = replies[S.ATTRIBUTION_METHOD_UNSPECIFIED]
    assert reagent.method == S.ATTRIBUTION_METHOD_REAGENT and reagent.replacement_model == "tiny"
    for reply in replies.values():
        assert list(reply.context_token_ids) == context and len(reply.target_token_ids) == 3
        assert [a.target_index for a in reply.attributions] == [0, 1, 2]
        assert all(len(a.importance) == len(context) for a in reply.attributions)
        assert reply.timing.total_ns >= reply.timing.forward_ns > 0
    # greedy and deterministic: every method explains the same tokens
    assert len({tuple(r.target_token_ids) for r in replies.values()}) == 1
    assert all(sum(a.importance) == pytest.approx(1, abs=1e-5) for a in reagent.attributions)
    assert all(a.steps >= 1 for a in reagent.attributions)
    again = stub.Attribute(S.AttributeRequest(context=ids(context), max_new_tokens=3, seed=5))
    assert [list(a.importance) for a in again.attributions] == [
        list(a.importance) for a in reagent.attributions
    ]
    given = stub.Attribute(
        S.AttributeRequest(
            context=text("the wind"), target_text=" in the", method=S.ATTRIBUTION_METHOD_RANDOM
        )
    )
    assert list(given.target_token_ids) == servicer.tokenizer.encode(" in the")


def test_attribute_bad_input_names_the_field(scoring) -> None:
    servicer, stub, channel = scoring
    ctx = servicer.engine.max_context
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    A = S.AttributeRequest
    for request, field in (
        (A(context=text("")), "context.text"),
        (A(), "context"),
        (A(context=ids([])), "context.token_ids.ids"),
        (A(context=ids([1] * (ctx - 7))), "context"),  # no room for the 8 default target tokens
        (A(context=text("a b"), replace_ratio_percent=101), "replace_ratio_percent"),
        (A(context=text("a b"), replace_ratio_percent=-1), "replace_ratio_percent"),
        (A(context=text("a b"), max_new_tokens=33), "max_new_tokens"),
        (A(context=text("a b"), max_new_tokens=-1), "max_new_tokens"),
        (A(context=text("a b"), target_text="ab " * 40), "target_text"),
        (A(context=text("a b"), method=9), "method"),
    ):
        assert refused(stub.Attribute, request) == (INVALID, [field]), field
    assert refused(stub.Attribute, A(context=ids([1, 10**6]))) == (
        grpc.StatusCode.OUT_OF_RANGE,
        ["context.token_ids.ids"],
    )
    raw = channel.unary_unary("/specmesh.v1.ScoringService/Attribute")
    for request, field in (
        (A(context=text("ab")), "context.text"),
        (A(context=text("x"), target_text="ab"), "target_text"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            raw(request.SerializeToString().replace(b"ab", b"\xff\xfe"))
        assert (e.value.code(), [v.field for v in status_details(e.value)[2]]) == (INVALID, [field])
    assert_healthy(channel)
    assert stub.Attribute(A(context=text("still fine"), max_new_tokens=1, method=S.ATTRIBUTION_METHOD_RANDOM))


def test_methods_needing_models_we_lack(scoring) -> None:
    servicer, stub, _ = scoring
    from services.scoring.servicer import ScoringServicer

    bare = ScoringServicer(servicer.engine, servicer.tokenizer, worker=servicer._worker)
    import asyncio

    from services.core.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition) as e:
        asyncio.run(bare.Detect(S.DetectRequest(input=text("a"), methods=[S.DETECT_METHOD_BINOCULARS]), None))
    assert e.value.field == "methods" and "--observer" in e.value.message
    with pytest.raises(FailedPrecondition) as e:
        asyncio.run(
            bare.Membership(S.MembershipRequest(input=text("a"), methods=[S.MEMBERSHIP_METHOD_DC_PDD]), None)
        )
    assert e.value.field == "methods"
    all_available = asyncio.run(bare.Detect(S.DetectRequest(input=text("a b")), None))
    assert S.DETECT_METHOD_BINOCULARS not in [s.method for s in all_available.scores]
    assert len(all_available.scores) == 4
