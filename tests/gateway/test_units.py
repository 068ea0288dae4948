"""Gateway pieces without servers: stop rules, statistics, budgets, the adaptive budget, validation."""

from __future__ import annotations

import random

import pytest

from gateway.budget import (
    CHAIN,
    DEFAULT_BUDGETS,
    DYNAMIC_TREE,
    LOOKUP_TOKENS,
    MULTI_CANDIDATE,
    PROMPT_LOOKUP,
    STATIC_TREE,
    AdaptiveBudget,
    Budget,
    cap_budget,
    resolve_budget,
    strategy_name,
    strategy_value,
)
from gateway.config import GatewayConfig
from gateway.policies.draft import chain_tokens
from gateway.policies.speculative import checked_path
from gateway.record import draft_seed
from gateway.requests import validate
from gateway.stats import SpecCounter, tree_depth
from gateway.stops import OutputState
from services.core.errors import FailedPrecondition, InvalidArgument, OutOfRange, SpecmeshError
from services.core.params import GenerationParams
from specmesh.v1 import common_pb2, gateway_pb2, target_pb2

# --- stop rules ------------------------------------------------------------------------------


def words(tok, *ids: int) -> str:
    return tok.decode(list(ids))


def test_max_new_tokens_truncates_a_round(toy) -> None:
    out = OutputState(toy.tokenizer, GenerationParams(max_new_tokens=5))
    kept, text = out.feed([2, 3, 4])
    assert kept == [2, 3, 4] and out.finish is None and out.remaining == 2
    kept2, text2 = out.feed([5, 6, 7, 8])
    assert kept2 == [5, 6] and out.finish == "length"
    assert out.tokens == [2, 3, 4, 5, 6]
    assert text + text2 == out.text == words(toy.tokenizer, 2, 3, 4, 5, 6)
    assert out.feed([9]) == ([], "")  # nothing after the end


def test_eos_is_emitted_and_ends_the_output(toy) -> None:
    out = OutputState(toy.tokenizer, GenerationParams(max_new_tokens=50))
    kept, text = out.feed([2, 3, toy.EOS, 4, 5])
    assert kept == [2, 3, toy.EOS] and out.finish == "eos"
    assert text == "w2 w3"


def test_ignore_eos_and_stop_ids(toy) -> None:
    out = OutputState(
        toy.tokenizer, GenerationParams(max_new_tokens=50, ignore_eos=True, stop_token_ids=(7,))
    )
    kept, _ = out.feed([2, toy.EOS, 3, 7, 8])
    assert kept == [2, toy.EOS, 3, 7] and out.finish == "eos"


def test_stop_string_is_cut_from_the_text(toy) -> None:
    out = OutputState(toy.tokenizer, GenerationParams(max_new_tokens=50, stop_strings=("w5 w6",)))
    pieces = []
    for round_tokens in ([2, 3, 4, 5], [6, 7, 8]):
        kept, text = out.feed(round_tokens)
        pieces.append(text)
    assert out.finish == "stop_string"
    assert out.tokens == [2, 3, 4, 5, 6]  # the token completing the stop string is reported, the rest dropped
    assert "".join(pieces) == "w2 w3 w4 "
    assert "w5" not in out.text


def test_text_is_held_back_while_it_may_start_a_stop_string(toy) -> None:
    out = OutputState(toy.tokenizer, GenerationParams(max_new_tokens=3, stop_strings=("w4 w9",)))
    _, text = out.feed([2, 4])
    assert text == "w2 "  # " w4" could still begin the stop string
    _, text = out.feed([5])
    assert out.finish == "length" and out.text == "w2 w4 w5"


# --- stats ---------------------------------------------------------------------------------------


def test_spec_counter() -> None:
    c = SpecCounter()
    assert c.tau == 0.0 and c.acceptance_rate == 0.0 and c.path_acceptance_rate == 0.0
    chain = [-1, 0, 1, 2]
    c.add_round(chain, [0, 1, 2, 3])  # all 4 accepted: ended on a leaf, 4 positions checked
    c.add_round(chain, [0])  # 1 accepted, rejected at depth 2: 2 positions
    c.add_round(chain, [])  # rejected at depth 1: 1 position
    assert c.rounds == 3 and c.drafted == 12 and c.accepted == 5
    assert c.tau == pytest.approx((5 + 3) / 3)
    assert c.acceptance_rate == pytest.approx(5 / 12)
    assert c.verified_path == 7 and c.path_acceptance_rate == pytest.approx(5 / 7)
    assert (c.depth_rounds, c.depth_accepted) == ([3, 3, 3, 3], [2, 1, 1, 1])
    p = c.to_proto()
    assert (p.rounds, p.drafted_tokens, p.accepted_tokens, p.verified_path_tokens) == (3, 12, 5, 7)
    assert p.mean_accepted_length == pytest.approx(8 / 3) and p.acceptance_rate == pytest.approx(5 / 12)
    assert p.path_acceptance_rate == pytest.approx(5 / 7)
    assert (list(p.rounds_by_depth), list(p.accepted_by_depth)) == ([3, 3, 3, 3], [2, 1, 1, 1])
    with pytest.raises(ValueError):
        c.add_round([-1], [0, 1])  # more accepted than drafted
    with pytest.raises(ValueError):
        c.add_round([-1, -1, 0], [0, 1])  # 1 is not a child of 0
    assert SpecCounter(rounds=7).tau == 1.0  # plain decoding


def test_spec_counter_on_a_wide_tree() -> None:
    """A 16-node tree (4 children per node, depth 2 + one deeper branch) that yields 2 tokens:
    2/16 per drafted node, but 2/3 of the positions the target checked along its path."""
    parents = [-1] * 4 + [0] * 4 + [1] * 4 + [4] * 4  # depth 3 through node 4
    c = SpecCounter()
    c.add_round(parents, [0, 4])  # node 4 has children, all rejected: 3 positions
    assert c.acceptance_rate == pytest.approx(2 / 16) and c.path_acceptance_rate == pytest.approx(2 / 3)
    assert (c.depth_rounds, c.depth_accepted) == ([1, 1, 1], [1, 1, 0])
    c.add_round(parents, [1, 8])  # node 8 is a leaf: 2 positions, both accepted
    assert c.verified_path == 5 and (c.depth_rounds, c.depth_accepted) == ([2, 2, 2], [2, 2, 0])
    c.add_round([], [])  # nothing drafted (the target alone): nothing checked
    assert c.verified_path == 5 and c.rounds == 3


def test_tree_depth() -> None:
    assert tree_depth([]) == 0
    assert tree_depth([-1, 0, 1, 2]) == 4
    assert tree_depth([-1, -1, 0, 0, 2]) == 3
    assert tree_depth([-1, 0, 1, -1, 3, 4, 5]) == 4  # two candidates, the second longer


def test_chain_tokens_andchecked_path() -> None:
    chain = common_pb2.TokenTree(tokens=[5, 6, 7], parents=[-1, 0, 1])
    assert chain_tokens(chain) == [5, 6, 7]
    assert chain_tokens(common_pb2.TokenTree(tokens=[5, 6, 7], parents=[-1, -1, 0])) == [5]
    tree = common_pb2.TokenTree(tokens=[5, 6, 7, 8], parents=[-1, -1, 1, 2])
    ok = target_pb2.VerifyResponse(accepted_nodes=[1, 2], accepted_tokens=[6, 7], next_token=3)
    assert checked_path(tree, ok) == [6, 7]
    for nodes, tokens in (([0, 2], [5, 7]), ([1, 2], [6, 9]), ([4], [1]), ([1], [6, 7])):
        bad = target_pb2.VerifyResponse(accepted_nodes=nodes, accepted_tokens=tokens)
        with pytest.raises(SpecmeshError):
            checked_path(tree, bad)


def test_draft_seed_is_deterministic_and_distinct() -> None:
    assert draft_seed(1) == draft_seed(1) != draft_seed(2)
    assert draft_seed(1) != 1 and 0 <= draft_seed(2**64 - 1) < 2**63


# --- budgets -------------------------------------------------------------------------------------


def test_strategy_names_roundtrip() -> None:
    for name in ("chain", "static-tree", "dynamic-tree", "multi-candidate", "prompt-lookup"):
        assert strategy_name(strategy_value(name)) == name
    assert strategy_value("DYNAMIC_TREE") == DYNAMIC_TREE
    with pytest.raises(InvalidArgument):
        strategy_value("beam")


def test_resolve_budget_defaults_and_overrides() -> None:
    assert resolve_budget(CHAIN, None) == DEFAULT_BUDGETS[CHAIN]
    b = resolve_budget(STATIC_TREE, common_pb2.TreeBudget(max_depth=5))
    static = DEFAULT_BUDGETS[STATIC_TREE]
    assert b == Budget(static.max_nodes, 5, static.branching, lookup_tokens=LOOKUP_TOKENS)
    # lookup_tokens: unset takes the default, an explicit 0 turns prompt lookup off
    assert resolve_budget(CHAIN, common_pb2.TreeBudget(lookup_tokens=0)).lookup_tokens == 0
    assert resolve_budget(CHAIN, common_pb2.TreeBudget(lookup_tokens=12)).lookup_tokens == 12
    assert resolve_budget(PROMPT_LOOKUP, None).lookup_tokens == 0
    b = resolve_budget(MULTI_CANDIDATE, common_pb2.TreeBudget(max_nodes=20, num_candidates=4))
    assert (b.max_nodes, b.num_candidates) == (20, 4)


@pytest.mark.parametrize(
    "budget, error, field",
    [
        (common_pb2.TreeBudget(max_nodes=-1), InvalidArgument, "spec.budget.max_nodes"),
        (common_pb2.TreeBudget(max_depth=1000), OutOfRange, "spec.budget.max_depth"),
        (common_pb2.TreeBudget(branching=17), OutOfRange, "spec.budget.branching"),
        (common_pb2.TreeBudget(num_candidates=-2), InvalidArgument, "spec.budget.num_candidates"),
        (common_pb2.TreeBudget(max_nodes=300), OutOfRange, "spec.budget.max_nodes"),
        (common_pb2.TreeBudget(lookup_tokens=-1), OutOfRange, "spec.budget.lookup_tokens"),
        (common_pb2.TreeBudget(lookup_tokens=33), OutOfRange, "spec.budget.lookup_tokens"),
        (common_pb2.TreeBudget(max_nodes=250, lookup_tokens=8), OutOfRange, "spec.budget.lookup_tokens"),
    ],
)
def test_resolve_budget_rejects(budget, error, field) -> None:
    with pytest.raises(error) as info:
        resolve_budget(DYNAMIC_TREE, budget)
    assert info.value.field == field


def test_multi_candidate_needs_a_node_per_candidate() -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve_budget(MULTI_CANDIDATE, common_pb2.TreeBudget(max_nodes=2, num_candidates=3))
    assert info.value.field == "spec.budget.num_candidates"


def test_cap_budget() -> None:
    b = Budget(max_nodes=16, max_depth=6, branching=2)
    assert cap_budget(b, remaining_tokens=100, context_room=100) is b
    assert cap_budget(b, remaining_tokens=4, context_room=100) == Budget(16, 3, 2)  # 3 drafted + 1 bonus
    assert cap_budget(b, remaining_tokens=1, context_room=100).max_depth == 1
    assert cap_budget(b, remaining_tokens=100, context_room=5) == Budget(5, 5, 2)
    assert cap_budget(b, remaining_tokens=100, context_room=0) == Budget(1, 1, 2)
    # the lookup path is a chain: capped by the tokens still wanted and by the room after the tree
    b = Budget(max_nodes=16, max_depth=6, branching=2, lookup_tokens=8)
    assert cap_budget(b, remaining_tokens=100, context_room=100) is b
    assert cap_budget(b, remaining_tokens=4, context_room=100).lookup_tokens == 3
    assert cap_budget(b, remaining_tokens=100, context_room=20).lookup_tokens == 4
    assert cap_budget(b, remaining_tokens=100, context_room=10).lookup_tokens == 0


def test_adaptive_budget_grows_on_full_acceptance() -> None:
    a = AdaptiveBudget(Budget(max_nodes=4, max_depth=4), max_depth=7, max_nodes=64)
    depths = []
    for _ in range(6):
        b = a.current()
        a.update(accepted=b.max_depth, drafted_depth=b.max_depth)
        depths.append(a.depth)
    assert depths == [5, 6, 7, 7, 7, 7]
    assert a.current() == Budget(max_nodes=7, max_depth=7)  # a chain keeps nodes == depth


def play(a: AdaptiveBudget, rounds: int, accepted, verify_s, draft_level_s: float) -> list[int]:
    """Run `rounds` rounds against a cost model; accepted(depth) -> levels accepted. Returns depths."""
    depths = []
    for _ in range(rounds):
        b = a.current()
        d = b.max_depth if b else 0
        n = 1 + (b.max_nodes if b else 0)
        a.update(
            accepted(d), d, draft_s=d * draft_level_s if d else None, verify_s=verify_s(n), verified_tokens=n
        )
        depths.append(d)
    return depths


def cpu_verify(n: int) -> float:  # 40 ms, then +7 ms per extra token (a CPU target)
    return 0.040 + 0.007 * (n - 1)


def test_adaptive_budget_stops_drafting_for_a_useless_draft_and_keeps_probing() -> None:
    a = AdaptiveBudget(Budget(max_nodes=12, max_depth=4, num_candidates=3), probe_every=8)
    depths = play(a, 60, lambda d: 0, cpu_verify, 0.008)
    assert depths[0] == 4 and a.acceptance < 0.1
    tail = depths[20:]
    assert tail.count(0) >= 40 * 7 // 8 - 1  # the target decodes alone ...
    assert set(tail) == {0, 1}  # ... except one single-level probe every 8 rounds
    assert a.nodes(1) == 3  # the tree keeps its width when it drafts again


def test_adaptive_budget_recovers_when_the_draft_is_accepted_again() -> None:
    a = AdaptiveBudget(Budget(max_nodes=4, max_depth=4), probe_every=4)
    play(a, 30, lambda d: 0, cpu_verify, 0.008)
    depths = play(a, 30, lambda d: d, cpu_verify, 0.008)  # now every drafted level is accepted
    assert depths[-1] >= 4 and a.acceptance > 0.8


def _simulate(depth_of, alpha: float, verify, level_s: float, rounds: int = 3000, seed: int = 0) -> float:
    """Tokens per simulated second of a chain drafter whose levels are each accepted with
    probability `alpha` (until the first rejection), against the cost model `verify(tokens)` +
    `level_s` per drafted level. depth_of(previous round) -> this round's depth; the adaptive
    budget sees exactly what the gateway would measure."""
    rng = random.Random(seed)
    tokens = seconds = 0.0
    last = None
    for _ in range(rounds):
        d = depth_of(last)
        accepted = 0
        while accepted < d and rng.random() < alpha:
            accepted += 1
        cost = verify(d + 1) + d * level_s
        tokens += accepted + 1
        seconds += cost
        last = (accepted, d, cost - verify(d + 1), verify(d + 1))
    return tokens / seconds


def _adaptive_policy(max_depth: int = 8):
    a = AdaptiveBudget(Budget(max_nodes=max_depth, max_depth=max_depth), max_depth=max_depth)

    def depth_of(last) -> int:
        if last is not None:
            accepted, d, draft_s, verify_s = last
            a.update(accepted, d, draft_s=draft_s if d else None, verify_s=verify_s, verified_tokens=d + 1)
        b = a.current()
        return b.max_depth if b else 0

    return depth_of


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.8, 0.95])
@pytest.mark.parametrize(
    "verify, level_s",
    [
        (cpu_verify, 0.008),
        (lambda n: 0.020, 0.002),  # a GPU-like target: 9 tokens cost what one costs
    ],
    ids=["cpu", "flat"],
)
def test_adaptive_budget_gets_close_to_the_best_fixed_depth(alpha, verify, level_s) -> None:
    """Simulated throughput of the adaptive budget against every fixed depth 0..8: within 10%
    of the best one, whichever it is. The bound has power: in each case some fixed depth misses it."""
    fixed = [_simulate(lambda _, d=d: d, alpha, verify, level_s) for d in range(9)]
    adaptive = _simulate(_adaptive_policy(), alpha, verify, level_s)
    assert adaptive >= 0.9 * max(fixed), (adaptive, fixed)
    assert min(fixed) < 0.9 * max(fixed)  # negative control: a wrong depth fails the same bound


def test_adaptive_budget_estimates_unmeasured_verification_costs() -> None:
    a = AdaptiveBudget(Budget(max_nodes=4, max_depth=4))
    assert a.verify_cost(3) is None
    a.update(0, 0, verify_s=0.040, verified_tokens=2)
    a.update(0, 0, verify_s=0.080, verified_tokens=6)
    assert a.verify_cost(1) == 0.040  # below the measured range: the smallest cost (optimistic)
    assert a.verify_cost(4) == pytest.approx(0.060)  # interpolated
    assert a.verify_cost(12) == pytest.approx(0.160)  # above it: proportional (pessimistic)


def test_adaptive_budget_does_not_grow_on_a_capped_round() -> None:
    a = AdaptiveBudget(Budget(max_nodes=6, max_depth=6))
    a.update(accepted=2, drafted_depth=2)  # the tree was cut to 2 by max_new_tokens; all accepted
    assert a.depth == 6


# --- validation ----------------------------------------------------------------------------------

TARGET = common_pb2.ModelInfo(name="toy-target", vocab_size=64, max_context=256)
DRAFT = common_pb2.ModelInfo(name="toy-draft", vocab_size=64, max_context=128, features=["route"])


def request(**kw) -> gateway_pb2.GatewayGenerateRequest:
    kw.setdefault("prompt", common_pb2.Prompt(text="w3 w4 w5"))
    kw.setdefault("sampling", common_pb2.SamplingParams(max_new_tokens=8))
    return gateway_pb2.GatewayGenerateRequest(**kw)


def plan_of(toy, req, config=None, has_draft=True):
    config = config or GatewayConfig()
    return validate(
        req, tokenizer=toy.tokenizer, target_info=TARGET, draft_info=DRAFT, config=config, has_draft=has_draft
    )


def test_validate_defaults(toy) -> None:
    p = plan_of(toy, request())
    assert p.policy == gateway_pb2.POLICY_SPECULATIVE and p.strategy == CHAIN
    assert p.prompt_ids == (3, 4, 5) and p.model == "toy-target" and p.operation == "text_completion"
    assert p.budget == DEFAULT_BUDGETS[CHAIN] and not p.adaptive
    assert p.sampling.HasField("seed") and p.seed == p.sampling.seed == p.params.seed
    seeded = plan_of(toy, request(sampling=common_pb2.SamplingParams(max_new_tokens=4, seed=2**64 - 1)))
    assert seeded.seed == 2**64 - 1
    chat = common_pb2.Prompt(
        chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="w9")])
    )
    p = plan_of(toy, request(prompt=chat, policy=gateway_pb2.POLICY_TARGET))
    assert p.operation == "chat" and p.prompt_ids == tuple(toy.tokenizer.encode("user w9 w2"))
    config = GatewayConfig(default_policy=gateway_pb2.POLICY_TARGET, default_strategy=DYNAMIC_TREE)
    assert plan_of(toy, request(), config).policy == gateway_pb2.POLICY_TARGET
    p = plan_of(toy, request(policy=gateway_pb2.POLICY_SPECULATIVE), config)
    assert p.strategy == DYNAMIC_TREE and p.budget == DEFAULT_BUDGETS[DYNAMIC_TREE]


def test_quality_exact_is_served_by_the_lossless_policies(toy) -> None:
    for policy in (gateway_pb2.POLICY_TARGET, gateway_pb2.POLICY_SPECULATIVE):
        assert plan_of(toy, request(quality=gateway_pb2.QUALITY_EXACT, policy=policy)).policy == policy


def ids(*tokens: int) -> common_pb2.Prompt:
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(tokens)))


@pytest.mark.parametrize(
    "kw, error, field",
    [
        (dict(resume_from=2), InvalidArgument, "resume_from"),
        (dict(model="llama-70b"), InvalidArgument, "model"),
        (dict(quality=gateway_pb2.QUALITY_FAST, policy=gateway_pb2.POLICY_R2R), InvalidArgument, "quality"),
        (
            dict(quality=gateway_pb2.QUALITY_EXACT, policy=gateway_pb2.POLICY_R2R),
            InvalidArgument,
            "quality",
        ),
        (dict(route=gateway_pb2.RouteOptions(threshold=0.5)), InvalidArgument, "route"),
        (
            dict(policy=gateway_pb2.POLICY_R2R, route=gateway_pb2.RouteOptions(threshold=1.5)),
            InvalidArgument,
            "route.threshold",
        ),
        (
            dict(policy=gateway_pb2.POLICY_R2R, route=gateway_pb2.RouteOptions(threshold=float("nan"))),
            InvalidArgument,
            "route.threshold",
        ),
        (dict(policy=17), InvalidArgument, "policy"),
        (dict(quality=9), InvalidArgument, "quality"),
        # HIGH / FAST are for policy auto, EXACT contradicts draft and r2r
        (dict(quality=gateway_pb2.QUALITY_HIGH), InvalidArgument, "quality"),
        (dict(quality=gateway_pb2.QUALITY_FAST), InvalidArgument, "quality"),
        (
            dict(quality=gateway_pb2.QUALITY_EXACT, policy=gateway_pb2.POLICY_DRAFT),
            InvalidArgument,
            "quality",
        ),
        (dict(prompt=common_pb2.Prompt()), InvalidArgument, "prompt"),
        (dict(prompt=common_pb2.Prompt(text="")), InvalidArgument, "prompt.text"),
        (dict(prompt=ids()), InvalidArgument, "prompt.token_ids.ids"),
        (dict(prompt=ids(3, 64)), InvalidArgument, "prompt.token_ids.ids"),
        (dict(prompt=ids(3, -1)), InvalidArgument, "prompt.token_ids.ids"),
        (
            dict(sampling=common_pb2.SamplingParams(max_new_tokens=0)),
            InvalidArgument,
            "sampling.max_new_tokens",
        ),
        (
            dict(sampling=common_pb2.SamplingParams(max_new_tokens=-3)),
            InvalidArgument,
            "sampling.max_new_tokens",
        ),
        # the draft's context (128) bounds speculative requests
        (dict(sampling=common_pb2.SamplingParams(max_new_tokens=126)), OutOfRange, "sampling.max_new_tokens"),
        (
            dict(sampling=common_pb2.SamplingParams(max_new_tokens=8, temperature=-1)),
            InvalidArgument,
            "sampling.temperature",
        ),
        (
            dict(sampling=common_pb2.SamplingParams(max_new_tokens=8, top_p=1.5)),
            InvalidArgument,
            "sampling.top_p",
        ),
        (
            dict(sampling=common_pb2.SamplingParams(max_new_tokens=8, stop_token_ids=[99])),
            OutOfRange,
            "sampling.stop_token_ids",
        ),
        (
            dict(sampling=common_pb2.SamplingParams(max_new_tokens=8, stop=[""])),
            InvalidArgument,
            "sampling.stop",
        ),
        (dict(spec=gateway_pb2.SpecOptions(strategy=42)), InvalidArgument, "spec.strategy"),
        (
            dict(spec=gateway_pb2.SpecOptions(budget=common_pb2.TreeBudget(max_depth=99))),
            OutOfRange,
            "spec.budget.max_depth",
        ),
        (dict(spec=gateway_pb2.SpecOptions(vocab_limit=65)), OutOfRange, "spec.vocab_limit"),
    ],
)
def test_validate_rejects(toy, kw, error, field) -> None:
    with pytest.raises(error) as info:
        plan_of(toy, request(**kw))
    assert info.value.field == field


def test_target_policy_uses_the_target_context_only(toy) -> None:
    req = request(policy=gateway_pb2.POLICY_TARGET, sampling=common_pb2.SamplingParams(max_new_tokens=200))
    assert plan_of(toy, req).params.max_new_tokens == 200
    with pytest.raises(OutOfRange):
        plan_of(
            toy,
            request(policy=gateway_pb2.POLICY_TARGET, sampling=common_pb2.SamplingParams(max_new_tokens=254)),
        )


def test_draft_policies_need_a_draft(toy) -> None:
    for policy in (gateway_pb2.POLICY_DRAFT, gateway_pb2.POLICY_SPECULATIVE):
        with pytest.raises(FailedPrecondition) as info:
            plan_of(toy, request(policy=policy), has_draft=False)
        assert info.value.field == "policy"
    assert plan_of(toy, request(policy=gateway_pb2.POLICY_TARGET), has_draft=False).budget is None


def test_draft_policy_plan(toy) -> None:
    p = plan_of(toy, request(policy=gateway_pb2.POLICY_DRAFT), GatewayConfig(draft_chunk=6))
    assert p.budget == Budget(6, 6)


def test_adaptive_from_request_or_config(toy) -> None:
    assert plan_of(toy, request(spec=gateway_pb2.SpecOptions(adaptive=True))).adaptive
    assert plan_of(toy, request(), GatewayConfig(adaptive=True)).adaptive
