"""What --help says agrees with what the commands do (issue 16, "docs that disagree"): one
strategy parser everywhere, the gateway's port default as it applies, every RPC listed."""

from __future__ import annotations

import pytest

from services.core.strategies import Strategy
from specmesh.cli.main import build_parser

# (argv before the strategy, the option, the attribute it sets)
STRATEGY_OPTIONS = [
    (["up"], "--strategy", "strategy"),
    (["quickstart"], "--strategy", "strategy"),
    (["generate"], "--strategy", "strategy"),
    (["serve", "gateway"], "--strategy", "strategy"),
    (["serve", "draft"], "--default-strategy", "default_strategy"),
]


@pytest.mark.parametrize(
    ("argv", "option", "dest"), STRATEGY_OPTIONS, ids=[" ".join(a) for a, _, _ in STRATEGY_OPTIONS]
)
def test_every_strategy_option_takes_both_spellings(argv, option, dest, capsys) -> None:
    parser = build_parser()
    for spelling in ("dynamic-tree", "dynamic_tree", "Dynamic-Tree"):
        assert getattr(parser.parse_args([*argv, option, spelling]), dest) is Strategy.DYNAMIC_TREE
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, option, "bushy"])
    err = capsys.readouterr().err
    assert "unknown strategy 'bushy'" in err and "dynamic-tree" in err  # the documented spelling


def test_bench_spec_strategies_take_both_spellings() -> None:
    args = build_parser().parse_args(
        [
            "bench",
            "spec",
            "--prompts",
            "p.jsonl",
            "--out",
            "o.json",
            "--strategies",
            "dynamic-tree,static_tree",
        ]
    )
    assert args.strategies == ["dynamic_tree", "static_tree"]  # the result keys


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_gateway_help_gives_one_port(capsys) -> None:
    text = help_text(["serve", "gateway"], capsys)
    assert "Listens on port 50050" in text and "[SPECMESH_PORT, default 50050]" in text
    assert "[SPECMESH_PORT, default 0]" not in text
    assert "[SPECMESH_SERVICE_NAME, default 'specmesh-gateway']" in text


def test_serve_help_lists_every_rpc(capsys) -> None:
    from specmesh.v1 import draft_pb2, scoring_pb2, target_pb2

    text = help_text(["serve"], capsys)
    services = ((target_pb2, "TargetService"), (draft_pb2, "DraftService"), (scoring_pb2, "ScoringService"))
    for module, service in services:
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            assert method.name in text
    assert "Verify" in text
