"""services.core.strategies: the one table of strategy / policy names, budget defaults and limits."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.core.errors import InvalidArgument, OutOfRange
from services.core.strategies import (
    DEFAULT_BUDGETS,
    LIMITS,
    POLICY_NAMES,
    STRATEGY_CLI_NAMES,
    STRATEGY_NAMES,
    Budget,
    Policy,
    Strategy,
    parse_policy,
    parse_strategy,
    resolve_budget,
)
from specmesh.v1 import common_pb2, gateway_pb2


def test_imports_without_torch() -> None:
    """With torch unimportable (None in sys.modules makes `import torch` raise ImportError), the
    module still imports and pulls in nothing that needs it."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import services.core.strategies as s\n"
        "assert s.Strategy('chain') is s.Strategy.CHAIN and s.LIMITS.max_nodes > 0\n"
        "try:\n"
        "    import torch  # noqa: F401\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('torch was importable: the test proves nothing')\n"
        "leaked = sorted(m for m in sys.modules if m.startswith('torch.'))\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_wire_names_match_the_protos() -> None:
    """Every strategy / policy names an enum value of the .proto, and every drafting strategy
    and policy of the .proto has a name here."""
    proto_strategies = set(common_pb2.DraftStrategy.DESCRIPTOR.values_by_name)
    proto_strategies.discard("DRAFT_STRATEGY_UNSPECIFIED")
    assert {s.wire for s in Strategy} == proto_strategies
    proto_policies = set(gateway_pb2.Policy.DESCRIPTOR.values_by_name)
    proto_policies.discard("POLICY_UNSPECIFIED")
    assert {p.wire for p in Policy} == proto_policies


def test_spellings() -> None:
    assert STRATEGY_NAMES == ("chain", "static_tree", "dynamic_tree", "multi_candidate", "prompt_lookup")
    assert STRATEGY_CLI_NAMES == ("chain", "static-tree", "dynamic-tree", "multi-candidate", "prompt-lookup")
    assert POLICY_NAMES == ("target", "draft", "speculative", "r2r", "auto")
    for s in Strategy:
        assert parse_strategy(s.value) is parse_strategy(s.cli) is parse_strategy(s.cli.upper()) is s
    with pytest.raises(InvalidArgument) as e:
        parse_strategy("beam", "spec.strategy")
    assert e.value.field == "spec.strategy" and "static-tree" in e.value.message
    assert parse_policy(" Speculative ") is Policy.SPECULATIVE and parse_policy("R2R") is Policy.R2R
    with pytest.raises(InvalidArgument):
        parse_policy("beam")
    assert [s for s in Strategy if not s.uses_model] == [Strategy.PROMPT_LOOKUP]
    assert [p for p in Policy if not p.uses_draft] == [Policy.TARGET]


def test_defaults_are_within_the_limits() -> None:
    """A request that sets nothing gets exactly the default budget, for every strategy."""
    assert set(DEFAULT_BUDGETS) == set(Strategy)
    for s in Strategy:
        assert resolve_budget(s) == DEFAULT_BUDGETS[s] == Budget.default(s) == Budget.default(s.value)
        b = DEFAULT_BUDGETS[s]
        assert b.max_nodes + b.lookup_tokens <= LIMITS.max_nodes
        assert (b.lookup_tokens > 0) == s.uses_model  # only model trees get the lookup path


def test_resolve_budget_at_and_over_the_limits() -> None:
    top = resolve_budget(
        Strategy.MULTI_CANDIDATE,
        max_nodes=LIMITS.max_nodes - LIMITS.lookup_tokens,
        max_depth=LIMITS.max_depth,
        branching=LIMITS.branching,
        num_candidates=LIMITS.num_candidates,
        lookup_tokens=LIMITS.lookup_tokens,
    )
    assert top.max_nodes + top.lookup_tokens == LIMITS.max_nodes
    for name in ("max_nodes", "max_depth", "branching", "num_candidates"):
        with pytest.raises(OutOfRange) as e:
            resolve_budget(Strategy.CHAIN, **{name: getattr(LIMITS, name) + 1}, field="budget")
        assert e.value.field == f"budget.{name}"
        with pytest.raises(InvalidArgument) as e:
            resolve_budget(Strategy.CHAIN, **{name: -1})
        assert e.value.field == f"budget.{name}"
    with pytest.raises(OutOfRange) as e:  # the whole tree, lookup path included
        resolve_budget(Strategy.CHAIN, max_nodes=LIMITS.max_nodes, lookup_tokens=1)
    assert e.value.field == "budget.lookup_tokens"
    assert (
        resolve_budget(Strategy.CHAIN, max_nodes=LIMITS.max_nodes, lookup_tokens=0).max_nodes
        == LIMITS.max_nodes
    )
