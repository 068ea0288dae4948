"""The gateway and the draft service enforce one set of budget limits.

The gateway resolves a request's budget and sends it to the draft as Propose's TreeBudget;
whatever the gateway accepts, up to the limits, the real DraftService (a tiny random engine on
loopback) must accept too, and one past a limit both refuse, naming the same field.
"""

from __future__ import annotations

import grpc
import pytest
from servers import ServerThread
from tiny_models import tiny_config

from gateway.budget import WIRE_BY_STRATEGY, budget_to_proto, resolve_budget
from gateway.config import GatewayConfig
from services.core import strategies
from services.core.engine import Engine
from services.core.errors import OutOfRange
from services.draft import convert
from services.draft.server import start_draft
from services.draft.servicer import DraftServicer
from services.runtime.errors import status_details
from services.runtime.settings import ServerSettings
from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc

LIMITS = strategies.LIMITS
PROMPT = [5, 17, 33, 5, 17, 60, 2, 9, 5, 17, 33, 5, 17]  # repeats: prompt lookup finds a path


def test_gateway_and_draft_share_the_limits_and_defaults() -> None:
    config = GatewayConfig()
    assert config.limits is convert.LIMITS is LIMITS
    for s in strategies.Strategy:
        wire = WIRE_BY_STRATEGY[s]
        assert convert.STRATEGIES[wire] is s
        # a request that leaves the budget unset gets the same budget from both
        assert resolve_budget(wire, None, defaults=config.default_budgets) == convert.budget_from_proto(
            common_pb2.TreeBudget(), s
        )


@pytest.fixture(scope="module")
def draft_stub():
    engine = Engine.from_config(tiny_config(max_position_embeddings=1024), seed=2, max_kv_tokens=8192)
    servicer = DraftServicer(engine)
    settings = ServerSettings(host="127.0.0.1", port=0, grace_seconds=1)
    with ServerThread(lambda: start_draft(servicer, settings)) as thread:
        channel = grpc.insecure_channel(thread.address)
        yield draft_pb2_grpc.DraftServiceStub(channel)
        channel.close()
    servicer.close()


def propose(stub, sid: str, strategy: strategies.Strategy, budget: common_pb2.TreeBudget):
    return stub.Propose(
        draft_pb2.ProposeRequest(
            session=common_pb2.SessionRef(session_id=sid, new_tokens=PROMPT, expected_length=len(PROMPT)),
            strategy=WIRE_BY_STRATEGY[strategy],
            budget=budget,
            sampling=common_pb2.SamplingParams(temperature=1.0, seed=1),
            random=common_pb2.RandomStream(seed=1, counter=0),
        )
    )


AT_LIMITS = [
    # every field at its limit, the whole tree (model nodes + lookup tokens) at max_nodes
    dict(
        max_nodes=LIMITS.max_nodes - LIMITS.lookup_tokens,
        max_depth=LIMITS.max_depth,
        branching=LIMITS.branching,
        num_candidates=LIMITS.num_candidates,
        lookup_tokens=LIMITS.lookup_tokens,
    ),
    # the case: max_nodes 129-256 passed the gateway and the draft refused it
    dict(max_nodes=LIMITS.max_nodes, max_depth=LIMITS.max_depth, lookup_tokens=0),
]


@pytest.mark.parametrize("strategy", list(strategies.Strategy), ids=str)
@pytest.mark.parametrize("fields", AT_LIMITS, ids=["all-fields", "max-nodes"])
def test_a_budget_the_gateway_accepts_at_the_limit_the_draft_accepts(draft_stub, strategy, fields) -> None:
    wire = WIRE_BY_STRATEGY[strategy]
    budget = resolve_budget(wire, common_pb2.TreeBudget(**fields), defaults=GatewayConfig().default_budgets)
    sent = budget_to_proto(budget)  # what the speculative policy sends in ProposeRequest.budget
    reply = propose(draft_stub, f"{strategy}-{fields['max_nodes']}", strategy, sent)
    assert 0 < len(reply.tree.tokens) <= budget.max_nodes + budget.lookup_tokens
    assert len(reply.tree.lookup_nodes) <= budget.lookup_tokens
    assert convert.budget_from_proto(sent, strategy) == budget


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(max_nodes=LIMITS.max_nodes + 1, lookup_tokens=0), "max_nodes"),
        (dict(max_depth=LIMITS.max_depth + 1), "max_depth"),
        (dict(branching=LIMITS.branching + 1), "branching"),
        (dict(num_candidates=LIMITS.num_candidates + 1), "num_candidates"),
        (dict(lookup_tokens=LIMITS.lookup_tokens + 1), "lookup_tokens"),
        (dict(max_nodes=LIMITS.max_nodes, lookup_tokens=1), "lookup_tokens"),  # the tree as a whole
    ],
    ids=["max_nodes", "max_depth", "branching", "num_candidates", "lookup_tokens", "tree"],
)
def test_one_past_a_limit_both_refuse_the_same_field(draft_stub, fields, name) -> None:
    strategy = strategies.Strategy.DYNAMIC_TREE
    requested = common_pb2.TreeBudget(**fields)
    with pytest.raises(OutOfRange) as e:
        resolve_budget(WIRE_BY_STRATEGY[strategy], requested)
    assert e.value.field == f"spec.budget.{name}"
    with pytest.raises(grpc.RpcError) as err:
        propose(draft_stub, f"over-{name}", strategy, requested)
    code, message, violations = status_details(err.value)
    assert (code, [v.field for v in violations]) == (grpc.StatusCode.OUT_OF_RANGE, [f"budget.{name}"]), (
        message
    )
