"""Router training (R2R): threshold and metrics, the fit, a real run's files, the CLI."""

from __future__ import annotations

import argparse

import pytest
import torch

from services.core.engine import weights_digest
from services.draft.router import CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE
from services.draft.training.router import (
    RouterRecipe,
    auc,
    fit,
    metrics,
    probabilities,
    threshold_for_recall,
)
from services.draft.training.router_labels import DIVERGENT, MATCH, NEUTRAL, RouterData


def test_threshold_for_recall_is_the_highest_that_keeps_the_recall() -> None:
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    positive = torch.tensor([True, False, True, True, False, True, False, False])
    t = threshold_for_recall(scores, positive, 0.75)  # 3 of 4 positives: down to 0.6, next lower 0.5
    assert t == pytest.approx(0.55)
    assert metrics(scores, positive, t)["recall"] == 0.75
    assert threshold_for_recall(scores, positive, 1.0) == pytest.approx(0.35)
    assert threshold_for_recall(scores, torch.zeros(8, dtype=torch.bool), 0.9) == 0.5  # no positives


def test_auc_counts_ties_half() -> None:
    positive = torch.tensor([True, True, False, False])
    assert auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), positive) == 1.0
    assert auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), positive) == 0.0
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), positive) == 0.5
    assert auc(torch.tensor([0.9, 0.5, 0.5, 0.1]), positive) == 0.875  # 3 wins + one tie of 4 pairs
    assert auc(torch.tensor([0.9, 0.1]), torch.tensor([True, True])) is None


def test_metrics_at_a_threshold() -> None:
    scores = torch.tensor([0.9, 0.8, 0.3, 0.1])
    positive = torch.tensor([True, False, True, False])
    m = metrics(scores, positive, 0.5)
    assert m == {"positions": 4, "precision": 0.5, "recall": 0.5, "auc": 0.75, "flagged_share": 0.5}


def test_fit_learns_a_rule_in_the_features() -> None:
    torch.manual_seed(0)
    n, H, k = 512, 16, 8
    hidden = torch.randn(n, H)
    label = torch.where(hidden[:, 0] > 0.5, DIVERGENT, torch.where(hidden[:, 1] > 0, NEUTRAL, MATCH)).to(
        torch.int8
    )
    data = RouterData(
        hidden,
        torch.randn(n, H),
        torch.randn(n, k),
        label,
        torch.zeros(n, dtype=torch.bool),
        torch.ones(n, dtype=torch.bool),
    )
    net = fit(data, RouterRecipe(epochs=8, top_k=k, width=32, batch=64, lr=3e-3))
    assert auc(probabilities(net, data), data.divergent) > 0.9  # chance: 0.5


def test_a_real_run_writes_the_router_files(trained_router) -> None:
    d, config = trained_router.router_dir, trained_router.config
    assert d == trained_router.draft_dir / "router"
    for name in (ONNX_FILE, WEIGHTS_FILE, CONFIG_FILE):
        assert (d / name).is_file()
    assert not (d.parent / "router.tmp").exists()
    assert config["hidden_size"] == 576 and config["draft_vocab_size"] == 4096 and config["top_k"] == 32
    assert config["draft_digest"] == weights_digest(trained_router.draft_dir)
    assert 0.0 <= config["threshold"] <= 1.0 and config["int8"] in (True, False)
    report = config["report"]
    labels = report["labels"]["all"]
    assert labels["match"] + labels["neutral"] + labels["divergent"] == labels["positions"] > 0
    assert report["labels"]["held_out"]["positions"] > 0 and report["labels"]["train"]["positions"] > 0
    assert set(report["texts"]) == {"chat_train", "chat_held_out", "corpus_train", "corpus_held_out"}
    assert report["cpu"] and report["minutes"]["total_before_export"] > 0
    assert report["held_out"]["all"]["flagged_share"] is not None


def test_cli_registers_train_router() -> None:
    from specmesh.cli import train

    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["train", "router", "--prompts", "8", "--window", "4", "--recall", "0.8", "--no-int8"]
    )
    assert args.func is train.run_router
    assert (args.draft, args.prompts, args.window, args.recall, args.int8) == (
        "smollm2-135m-instruct-draft",
        8,
        4,
        0.8,
        False,
    )
    assert parser.parse_args(["train", "router"]).int8 is None  # the recipe's default (int8, as served)
    with pytest.raises(Exception, match="recall"):
        RouterRecipe(recall=1.5).check()


def test_cli_help_states_the_recipe_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from specmesh.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "router", "--help"])
    options = " ".join(capsys.readouterr().out.split()).split(" --")  # argparse wraps lines
    r = RouterRecipe()
    for flag in ("prompts", "documents", "window", "recall", "epochs"):
        value = getattr(r, flag)
        assert any(o.startswith(f"{flag} ") and f"(default {value})" in o for o in options), flag
