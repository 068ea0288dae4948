"""Draft and target services on real SmolLM2 weights, driven round by round over gRPC.

Greedy speculative output equals target-only greedy output token for token (every draft
strategy); bad trees and sessions get INVALID_ARGUMENT / FAILED_PRECONDITION naming the
field; sessions survive; an identical retried round gives the same tokens.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from servers import ServerThread

from services.draft.server import load_draft, start_draft
from services.runtime.errors import status_details
from services.runtime.settings import ServerSettings
from services.target.server import load_target, start_target
from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc

pytestmark = pytest.mark.slow

STRATEGIES = {
    "chain": common_pb2.DRAFT_STRATEGY_CHAIN,
    "static_tree": common_pb2.DRAFT_STRATEGY_STATIC_TREE,
    "dynamic_tree": common_pb2.DRAFT_STRATEGY_DYNAMIC_TREE,
    "multi_candidate": common_pb2.DRAFT_STRATEGY_MULTI_CANDIDATE,
    "prompt_lookup": common_pb2.DRAFT_STRATEGY_PROMPT_LOOKUP,
}


@pytest.fixture(scope="module")
def stack(smollm2_dir, draft_dir):
    target = load_target(str(smollm2_dir), max_sessions=16)
    draft = load_draft(str(draft_dir), max_sessions=16)
    settings = ServerSettings(host="127.0.0.1", port=0)
    with (
        ServerThread(lambda: start_target(target, settings)) as t_srv,
        ServerThread(lambda: start_draft(draft, settings)) as d_srv,
    ):
        t_ch, d_ch = grpc.insecure_channel(t_srv.address), grpc.insecure_channel(d_srv.address)
        yield target, target_pb2_grpc.TargetServiceStub(t_ch), draft_pb2_grpc.DraftServiceStub(d_ch)
        t_ch.close()
        d_ch.close()
    target.close()
    draft.close()


def ref(sid: str, new: list[int], length: int) -> common_pb2.SessionRef:
    return common_pb2.SessionRef(session_id=sid, new_tokens=new, expected_length=length)


def speculate(t_stub, d_stub, prompt, n, strategy, sid, temperature=0.0, seed=0, lookup_tokens=0):
    sampling = common_pb2.SamplingParams(temperature=temperature)
    out, t_new, d_new, t_len, d_len, rnd, drafted, accepted = [], list(prompt), list(prompt), 0, 0, 0, 0, 0
    while len(out) < n:
        random = common_pb2.RandomStream(seed=seed, counter=rnd)
        p = d_stub.Propose(
            draft_pb2.ProposeRequest(
                session=ref(sid, d_new, d_len + len(d_new)),
                strategy=strategy,
                budget=common_pb2.TreeBudget(lookup_tokens=lookup_tokens),
                sampling=sampling,
                random=random,
            )
        )
        v = t_stub.Verify(
            target_pb2.VerifyRequest(
                session=ref(sid, t_new, t_len + len(t_new)),
                tree=p.tree,
                sampling=sampling,
                rule=p.rule,
                random=random,
            )
        )
        emitted = list(v.accepted_tokens) + [v.next_token]
        drafted, accepted = drafted + len(p.tree.tokens), accepted + len(v.accepted_tokens)
        out += emitted
        d_len, t_len = p.session_length, v.session_length
        d_new, t_new, rnd = emitted, [v.next_token], rnd + 1
    for stub in (t_stub, d_stub):
        stub.Release(common_pb2.ReleaseRequest(session_id=sid))
    return out[:n], rnd, drafted, accepted


def target_greedy(t_stub, prompt, n):
    req = target_pb2.GenerateRequest(
        prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=prompt)),
        sampling=common_pb2.SamplingParams(max_new_tokens=n, ignore_eos=True),
    )
    return [t for c in t_stub.Generate(req) for t in c.token_ids]


@pytest.mark.parametrize(
    "strategy, lookup",
    [(s, 0) for s in STRATEGIES] + [("chain", 8), ("dynamic_tree", 8)],
    ids=list(STRATEGIES) + ["chain+lookup", "dynamic_tree+lookup"],
)
def test_greedy_speculative_equals_target_only(stack, strategy, lookup) -> None:
    servicer, t_stub, d_stub = stack
    tok = servicer.tokenizer
    for i, text in enumerate(["def add(a, b):\n    return", "What is the capital of France?"]):
        prompt = tok.encode_chat([{"role": "user", "content": text}]) if "?" in text else tok.encode(text)
        expected = target_greedy(t_stub, prompt, 24)
        got, rounds, drafted, accepted = speculate(
            t_stub, d_stub, prompt, 24, STRATEGIES[strategy], f"{strategy}-{lookup}-{i}", lookup_tokens=lookup
        )
        assert got == expected
        assert rounds <= 24 and accepted <= drafted


def test_prompt_lookup_path_is_merged_into_model_trees(stack) -> None:
    """The draft adds the lookup path to model trees, on top of max_nodes, and lists its new
    nodes; the target verifies such a sampled tree; bad values name the field."""
    _, t_stub, d_stub = stack
    prompt = [504, 3458, 28, 4458, 30, 504, 3458, 28]  # repeats: the lookup proposes 4458, 30, ...

    def propose(sid, lookup, temperature=0.0):
        return d_stub.Propose(
            draft_pb2.ProposeRequest(
                session=ref(sid, prompt, len(prompt)),
                strategy=common_pb2.DRAFT_STRATEGY_CHAIN,
                budget=common_pb2.TreeBudget(max_nodes=2, max_depth=2, lookup_tokens=lookup),
                sampling=common_pb2.SamplingParams(temperature=temperature),
            )
        ).tree

    plain, merged = propose("lk-0", 0), propose("lk-1", 4)
    assert len(plain.tokens) == 2 and list(merged.tokens[:2]) == list(plain.tokens)
    nodes = {(p, t): i for i, (t, p) in enumerate(zip(merged.tokens, merged.parents, strict=True))}
    path, node = [], -1  # follow the lookup path from the root
    for token in (4458, 30, 504, 3458):
        node = nodes[(node, token)]
        path.append(node)
    assert list(merged.lookup_nodes) == [i for i in path if i >= 2] and len(merged.tokens) == 2 + len(
        merged.lookup_nodes
    )
    sampled = propose("lk-2", 4, temperature=1.0)
    assert len(sampled.tokens) > 2 and sampled.lookup_nodes and sampled.expanded
    verify = target_pb2.VerifyRequest(
        session=ref("lk-2", prompt, len(prompt)),
        tree=sampled,
        sampling=common_pb2.SamplingParams(temperature=1.0),
        rule=common_pb2.ACCEPTANCE_RULE_CHAIN,  # one drawn child per node, plus lookup children
        random=common_pb2.RandomStream(seed=1, counter=0),
    )
    bad = target_pb2.VerifyRequest()
    bad.CopyFrom(verify)
    bad.tree.lookup_nodes.append(len(sampled.tokens))
    expect_error(lambda: t_stub.Verify(bad), "INVALID_ARGUMENT", "tree.lookup_nodes")
    bad.CopyFrom(verify)
    del bad.tree.lookup_nodes[:]  # the lookup path now reads as a second drawn child of a chain
    expect_error(lambda: t_stub.Verify(bad), "INVALID_ARGUMENT", "rule")
    v = t_stub.Verify(verify)  # the session survived the refusals
    assert v.session_length == len(prompt) + len(v.accepted_tokens)
    expect_error(lambda: propose("lk-3", 33), "OUT_OF_RANGE", "budget.lookup_tokens")
    for sid in ("lk-0", "lk-1", "lk-2", "lk-3"):
        d_stub.Release(common_pb2.ReleaseRequest(session_id=sid))
        t_stub.Release(common_pb2.ReleaseRequest(session_id=sid))


def first_round(t_stub, d_stub, sid, prompt, temperature=1.0):
    sampling = common_pb2.SamplingParams(temperature=temperature)
    p = d_stub.Propose(
        draft_pb2.ProposeRequest(
            session=ref(sid, prompt, len(prompt)),
            strategy=common_pb2.DRAFT_STRATEGY_STATIC_TREE,
            sampling=sampling,
        )
    )
    return p, target_pb2.VerifyRequest(
        session=ref(sid, prompt, len(prompt)),
        tree=p.tree,
        sampling=sampling,
        rule=p.rule,
        random=common_pb2.RandomStream(seed=3, counter=0),
    )


def expect_error(call, code: str, field: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call()
    got, message, violations = status_details(e.value)
    assert (got.name, [v.field for v in violations]) == (code, [field]), message


def test_bad_trees_are_refused_and_the_session_survives(stack) -> None:
    servicer, t_stub, d_stub = stack
    prompt = servicer.tokenizer.encode("The quick brown fox")
    p, good = first_round(t_stub, d_stub, "bad-trees", prompt)
    assert p.rule == common_pb2.ACCEPTANCE_RULE_TREE_WITHOUT_REPLACEMENT and len(p.tree.expanded) > 0

    def mutated(fn):
        req = target_pb2.VerifyRequest()
        req.CopyFrom(good)
        fn(req)
        return lambda: t_stub.Verify(req)

    def set_parents(values):
        def f(req):
            del req.tree.parents[:]
            req.tree.parents.extend(values)

        return f

    n = len(good.tree.tokens)
    expect_error(
        mutated(set_parents([0] * n)), "INVALID_ARGUMENT", "tree.parents"
    )  # node 0 is its own parent
    expect_error(mutated(set_parents([-1] + [n + 5] * (n - 1))), "INVALID_ARGUMENT", "tree.parents")
    expect_error(mutated(set_parents([1, 0] + [-1] * (n - 2))), "INVALID_ARGUMENT", "tree.parents")  # cycle
    expect_error(mutated(lambda r: r.tree.tokens.__setitem__(0, 10**6)), "INVALID_ARGUMENT", "tree.tokens")

    def set_prob(value):
        def f(req):
            req.tree.expanded[0].distribution.sparse.probs[0] = value

        return f

    expect_error(mutated(set_prob(math.nan)), "INVALID_ARGUMENT", "tree.expanded")
    expect_error(mutated(set_prob(-0.5)), "INVALID_ARGUMENT", "tree.expanded")
    expect_error(mutated(set_prob(5.0)), "INVALID_ARGUMENT", "tree.expanded")  # no longer sums to 1
    expect_error(mutated(lambda r: r.tree.ClearField("expanded")), "INVALID_ARGUMENT", "tree.expanded")

    def dense_wrong_size(req):
        req.tree.expanded[0].distribution.dense.CopyFrom(
            common_pb2.Tensor(dtype="float16", shape=[3], data=np.ones(3, np.float16).tobytes())
        )

    expect_error(mutated(dense_wrong_size), "INVALID_ARGUMENT", "tree.expanded")

    def huge_tree(req):
        del req.tree.tokens[:], req.tree.parents[:]
        req.tree.tokens.extend([5] * 300)
        req.tree.parents.extend(range(-1, 299))
        req.rule = common_pb2.ACCEPTANCE_RULE_CHAIN

    expect_error(mutated(huge_tree), "INVALID_ARGUMENT", "tree.tokens")
    # argmax matching would not reproduce the target's sampled distribution
    expect_error(
        mutated(lambda r: setattr(r, "rule", common_pb2.ACCEPTANCE_RULE_GREEDY)), "INVALID_ARGUMENT", "rule"
    )
    expect_error(
        lambda: d_stub.Propose(
            draft_pb2.ProposeRequest(
                session=ref("bad-trees", [], len(prompt)), budget=common_pb2.TreeBudget(max_nodes=100000)
            )
        ),
        "OUT_OF_RANGE",
        "budget.max_nodes",
    )
    # None of that touched the session: the good request still works.
    reply = t_stub.Verify(good)
    assert reply.session_length == len(prompt) + len(reply.accepted_tokens)


def test_session_mismatch_retry_and_unknown_session(stack) -> None:
    servicer, t_stub, d_stub = stack
    prompt = servicer.tokenizer.encode("Once upon a time")
    _, good = first_round(t_stub, d_stub, "retry", prompt)
    first = t_stub.Verify(good)
    again = t_stub.Verify(good)  # the response was "lost": an identical retry
    assert (list(again.accepted_tokens), again.next_token, again.session_length) == (
        list(first.accepted_tokens),
        first.next_token,
        first.session_length,
    )
    # A different request that disagrees with the session's length.
    stale = target_pb2.VerifyRequest()
    stale.CopyFrom(good)
    stale.random.counter = 1
    expect_error(lambda: t_stub.Verify(stale), "FAILED_PRECONDITION", "session.expected_length")
    # Unknown (or expired) session on a replica that never saw it: asks for the full prefix.
    expect_error(
        lambda: t_stub.Verify(target_pb2.VerifyRequest(session=ref("never-seen", [first.next_token], 40))),
        "FAILED_PRECONDITION",
        "session.expected_length",
    )
    expect_error(
        lambda: d_stub.Propose(draft_pb2.ProposeRequest(session=ref("never-seen", [5], 40))),
        "FAILED_PRECONDITION",
        "session.expected_length",
    )
    # The session continues correctly after all of that.
    nxt = t_stub.Verify(
        target_pb2.VerifyRequest(
            session=ref("retry", [first.next_token], first.session_length + 1), tree=common_pb2.TokenTree()
        )
    )
    assert nxt.session_length == first.session_length + 1
    for stub in (t_stub, d_stub):
        stub.Release(common_pb2.ReleaseRequest(session_id="retry"))


def released(stub, sid: str) -> bool:
    """Whether the service held a session under sid (Release says so, idempotently)."""
    return stub.Release(common_pb2.ReleaseRequest(session_id=sid)).released


@pytest.mark.parametrize("strategy", ["static_tree", "dynamic_tree", "multi_candidate"])
def test_tiny_temperature_is_the_greedy_limit(stack, strategy) -> None:
    """temperature 1e-45 samples in the T -> 0 limit on both services: no NaN, no INTERNAL, and
    the sampled rules then reproduce target-only greedy output (the logits have no exact ties)."""
    servicer, t_stub, d_stub = stack
    prompt = servicer.tokenizer.encode("def add(a, b):\n    return")
    expected = target_greedy(t_stub, prompt, 12)
    got, _, _, _ = speculate(
        t_stub, d_stub, prompt, 12, STRATEGIES[strategy], f"tiny-{strategy}", temperature=1e-45, seed=4
    )
    assert got == expected


def test_verify_input_gaps_are_refused_naming_the_field(stack) -> None:
    servicer, t_stub, d_stub = stack
    prompt = servicer.tokenizer.encode("The lazy dog sleeps")
    p, good = first_round(t_stub, d_stub, "gaps", prompt)
    vocab = servicer.engine.config.vocab_size

    def mutated(fn):
        req = target_pb2.VerifyRequest()
        req.CopyFrom(good)
        fn(req)
        return lambda: t_stub.Verify(req)

    def dense(shape, n):
        def f(req):
            req.tree.expanded[0].distribution.dense.CopyFrom(
                common_pb2.Tensor(dtype="float32", shape=shape, data=np.full(n, 1 / n, np.float32).tobytes())
            )

        return f

    # negative dimensions whose product matches the bytes (used to reach reshape: INTERNAL)
    field = "tree.expanded.distribution.dense.shape"
    expect_error(mutated(dense([-1, -vocab], vocab)), "INVALID_ARGUMENT", field)
    expect_error(mutated(dense([-vocab], vocab)), "INVALID_ARGUMENT", field)
    # sampling with no rule: the target cannot tell how the children were drawn
    unspecified = mutated(lambda r: setattr(r, "rule", common_pb2.ACCEPTANCE_RULE_UNSPECIFIED))
    expect_error(unspecified, "INVALID_ARGUMENT", "rule")

    def set_logprob(i, value):
        return lambda r: r.tree.draft_logprobs.__setitem__(i, value)

    for bad in (set_logprob(0, math.nan), set_logprob(-1, math.inf), set_logprob(0, 0.5)):
        expect_error(mutated(bad), "INVALID_ARGUMENT", "tree.draft_logprobs")
    expect_error(mutated(lambda r: r.tree.draft_logprobs.pop()), "INVALID_ARGUMENT", "tree.draft_logprobs")
    # none of that touched the session; the draft's logprobs are optional
    no_logprobs = target_pb2.VerifyRequest()
    no_logprobs.CopyFrom(good)
    no_logprobs.tree.ClearField("draft_logprobs")
    reply = t_stub.Verify(no_logprobs)
    assert reply.session_length == len(prompt) + len(reply.accepted_tokens)
    # an empty tree needs no rule when sampling: the target samples its next token
    after = t_stub.Verify(
        target_pb2.VerifyRequest(
            session=ref("gaps", [reply.next_token], reply.session_length + 1),
            sampling=common_pb2.SamplingParams(temperature=1.0),
            random=common_pb2.RandomStream(seed=3, counter=1),
        )
    )
    assert after.session_length == reply.session_length + 1 and not after.accepted_tokens
    # greedy: an unspecified rule still means argmax matching, for any tree
    greedy = t_stub.Verify(
        target_pb2.VerifyRequest(
            session=ref("gaps", [after.next_token], after.session_length + 1),
            tree=common_pb2.TokenTree(tokens=list(p.tree.tokens), parents=list(p.tree.parents)),
        )
    )
    assert greedy.session_length == after.session_length + 1 + len(greedy.accepted_tokens)
    assert released(t_stub, "gaps") and released(d_stub, "gaps")


def test_refused_calls_leave_no_session_behind(stack) -> None:
    """Every check runs before a new session is opened: after a refused call with a new id the
    session does not exist (Release finds nothing; a follow-up sees an unknown session)."""
    servicer, t_stub, d_stub = stack
    ctx = servicer.engine.max_context
    chain = common_pb2.TokenTree(tokens=[5] * 200, parents=list(range(-1, 199)))
    calls = [
        # no new token (the previous round's next_token) for the tree to hang off
        (
            lambda: t_stub.Verify(target_pb2.VerifyRequest(session=ref("v-new-0", [], 0))),
            "session.new_tokens",
        ),
        # the prefix fits, the tree after it does not
        (
            lambda: t_stub.Verify(
                target_pb2.VerifyRequest(session=ref("v-new-1", [5] * (ctx - 100), ctx - 100), tree=chain)
            ),
            "tree.tokens",
        ),
    ]
    codes = {"session.new_tokens": "INVALID_ARGUMENT", "tree.tokens": "OUT_OF_RANGE"}
    for i, (call, field) in enumerate(calls):
        expect_error(call, codes[field], field)
        assert f"v-new-{i}" not in servicer.sessions
        # a follow-up reads the id as unknown: the full prefix is asked for
        expect_error(
            lambda i=i: t_stub.Verify(target_pb2.VerifyRequest(session=ref(f"v-new-{i}", [5], 40))),
            "FAILED_PRECONDITION",
            "session.expected_length",
        )
        assert not released(t_stub, f"v-new-{i}")
    # the draft: a model strategy needs at least one token
    expect_error(
        lambda: d_stub.Propose(draft_pb2.ProposeRequest(session=ref("p-new-0", [], 0))),
        "FAILED_PRECONDITION",
        "session.new_tokens",
    )
    expect_error(
        lambda: d_stub.Prefill(draft_pb2.DraftPrefillRequest(session=ref("p-new-1", [], 0))),
        "FAILED_PRECONDITION",
        "session.new_tokens",
    )
    assert not released(d_stub, "p-new-0") and not released(d_stub, "p-new-1")


def test_propose_refuses_a_tree_that_does_not_fit_the_context(stack) -> None:
    """Propose checks length + max_nodes + lookup_tokens against the model context before it
    drafts or commits anything (OUT_OF_RANGE naming budget.max_nodes)."""
    _, _, d_stub = stack
    ctx = d_stub.GetModelInfo(common_pb2.GetModelInfoRequest()).max_context

    def propose(sid, n, strategy, **budget):
        prefix = [504, 3458, 28, 4458, 30] * (n // 5 + 1)
        return lambda: d_stub.Propose(
            draft_pb2.ProposeRequest(
                session=ref(sid, prefix[:n], n),
                strategy=STRATEGIES[strategy],
                budget=common_pb2.TreeBudget(**budget),
            )
        )

    # a chain's default 6 nodes after ctx - 5 tokens; 4 nodes + 1 lookup token after ctx - 4
    expect_error(propose("room-0", ctx - 5, "chain"), "OUT_OF_RANGE", "budget.max_nodes")
    expect_error(
        propose("room-1", ctx - 4, "chain", max_nodes=4, lookup_tokens=1), "OUT_OF_RANGE", "budget.max_nodes"
    )
    expect_error(propose("room-2", ctx - 7, "prompt_lookup", max_nodes=8), "OUT_OF_RANGE", "budget.max_nodes")
    for sid in ("room-0", "room-1", "room-2"):
        assert not released(d_stub, sid)  # refused before the session was opened
    # exactly full is fine (prompt lookup: no model forward over the long prefix)
    fits = propose("room-3", ctx - 8, "prompt_lookup", max_nodes=8)()
    assert fits.session_length == ctx - 8 and 0 < len(fits.tree.tokens) <= 8
    assert released(d_stub, "room-3")


def test_propose_refuses_fields_it_does_not_serve(stack) -> None:
    """target_hidden_states (feature-based drafts) is not served yet, and this draft service
    loads no router: a request setting them is refused naming the field, not silently drafted
    without them."""
    servicer, _, d_stub = stack
    prompt = servicer.tokenizer.encode("Hello there")
    hidden = servicer.engine.config.hidden_size
    cases = [
        (
            dict(
                target_hidden_states=common_pb2.Tensor(
                    dtype="float16", shape=[1, hidden], data=bytes(2 * hidden)
                )
            ),
            "target_hidden_states",
            "INVALID_ARGUMENT",
            "not served yet",
        ),
        (
            dict(target_hidden_states=common_pb2.Tensor()),
            "target_hidden_states",
            "INVALID_ARGUMENT",
            "not served yet",
        ),
        (dict(route=True), "route", "FAILED_PRECONDITION", "no router loaded"),
        (dict(route_threshold=0.5), "route_threshold", "INVALID_ARGUMENT", "set route=true"),
    ]
    for i, (fields, field, status, phrase) in enumerate(cases):
        call = lambda fields=fields, i=i: d_stub.Propose(  # noqa: E731
            draft_pb2.ProposeRequest(session=ref(f"unserved-{i}", prompt, len(prompt)), **fields)
        )
        with pytest.raises(grpc.RpcError) as e:
            call()
        code, message, violations = status_details(e.value)
        assert (code.name, [v.field for v in violations]) == (status, [field]), message
        assert phrase in message
        assert not released(d_stub, f"unserved-{i}")
