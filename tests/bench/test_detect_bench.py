"""`specmesh bench detect`: the metrics on hand-computed cases, the summary of made-up per-text
scores, the CLI parser, and one end-to-end run through an in-process scoring service on tiny
random models (the real run starts SmolLM2 and its draft: `specmesh bench detect`, not the suite)."""

from __future__ import annotations

import json

import grpc
import pytest
from servers import ServerThread

from bench import detect as bench
from specmesh.cli.main import build_parser

# --- AUROC -------------------------------------------------------------------------------------


def test_auroc_perfect_reversed_and_chance() -> None:
    assert bench.auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert bench.auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert bench.auroc([1.0, 4.0], [2.0, 3.0]) == 0.5  # 2 of the 4 pairs ordered right
    assert bench.auroc([], [1.0]) is None and bench.auroc([1.0], []) is None


def test_auroc_counts_ties_one_half() -> None:
    assert bench.auroc([2.0, 2.0], [2.0, 2.0]) == 0.5
    # pairs (machine, human): (1, 2) 0, (2, 2) 1/2, (3, 2) 1 -> 1.5 / 3
    assert bench.auroc([1.0, 2.0, 3.0], [2.0]) == 0.5
    # 0.9 beats all 3; 0.8 beats 0.5 and 0.3 and ties 0.8; 0.4 beats 0.3 -> (3 + 2.5 + 1) / 9
    assert bench.auroc([0.9, 0.8, 0.4], [0.5, 0.3, 0.8]) == pytest.approx(6.5 / 9)
    # unequal sizes, ties across and within the classes: machine [1, 1, 2, 3], human [1, 2]
    # pairs: 1 vs (1, 2): 0.5 + 0 twice; 2: 1 + 0.5; 3: 1 + 1 -> 4.5 / 8
    assert bench.auroc([1.0, 1.0, 2.0, 3.0], [1.0, 2.0]) == pytest.approx(4.5 / 8)


def test_auroc_matches_the_pair_count() -> None:
    machine = [0.3, 1.2, 0.7, 0.7, 2.0, -1.0, 0.0]
    human = [0.7, 0.1, -0.5, 0.0, 1.2]
    pairs = sum((m > h) + 0.5 * (m == h) for m in machine for h in human)
    assert bench.auroc(machine, human) == pytest.approx(pairs / (len(machine) * len(human)))


# --- TPR at 1% FPR -----------------------------------------------------------------------------


def test_tpr_at_1pct_fpr_with_100_human_texts() -> None:
    human = [float(i) for i in range(100)]  # 1 false positive allowed: the threshold is 98
    r = bench.tpr_at_fpr([98.5, 99.5, 50.0, 98.0], human)
    assert r == {"tpr": 0.5, "fpr": 0.01, "threshold": 98.0, "allowed_false_positives": 1}
    r = bench.tpr_at_fpr([1000.0], [float(i) for i in range(250)])  # 2 allowed (floor 2.5)
    assert (r["threshold"], r["fpr"], r["tpr"]) == (247.0, 2 / 250, 1.0)


def test_tpr_at_1pct_fpr_with_few_human_texts_lets_none_through() -> None:
    r = bench.tpr_at_fpr([0.5, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert r == {"tpr": 0.5, "fpr": 0.0, "threshold": 3.0, "allowed_false_positives": 0}


def test_tpr_at_1pct_fpr_ties_at_the_threshold_count_as_human() -> None:
    r = bench.tpr_at_fpr([5.0, 6.0], [5.0] * 200)  # 2 allowed, but none of the tied 200 is above
    assert (r["tpr"], r["fpr"], r["threshold"]) == (0.5, 0.0, 5.0)
    assert bench.tpr_at_fpr([], [1.0])["tpr"] is None


def test_roc_points_run_from_0_to_1() -> None:
    fpr, tpr = bench.roc_points([3.0, 2.0], [2.0, 1.0])
    assert fpr == [0.0, 0.0, 0.5, 1.0] and tpr == [0.0, 0.5, 1.0, 1.0]


# --- orientation and the summary ---------------------------------------------------------------


def test_orientation_by_higher_means_machine() -> None:
    assert bench.orient(2.5, True) == 2.5 and bench.orient(2.5, False) == -2.5


def test_method_keys() -> None:
    assert bench.method_key("DETECT_METHOD_LOG_RANK") == "log_rank"
    assert bench.method_key("DETECT_METHOD_FAST_DETECTGPT") == "fast_detectgpt"
    assert bench.method_key("DETECT_METHOD_PAWN") == "learned"


def rec(label: str, ll: float, rank: float, learned: float | None = None) -> dict:
    """One text's reply: log_likelihood (higher = machine), log_rank (lower = machine)."""
    scores = {"log_rank": rank, "log_likelihood": ll}
    higher = {"log_rank": False, "log_likelihood": True}
    if learned is not None:
        scores["learned"], higher["learned"] = learned, True
    return {"label": label, "scores": scores, "higher_means_machine": higher}


def test_summary_orients_each_method_before_its_auroc() -> None:
    # machine text: higher log-likelihood and lower log-rank than every human text
    records = [rec("human", -3.0, 2.0), rec("human", -2.5, 1.8), rec("human", -2.0, 1.9)]
    records += [rec("machine", -1.0, 0.5), rec("machine", -1.5, 0.9)]
    s = bench.summarise(records)
    assert list(s) == ["log_likelihood", "log_rank"]  # METHOD_ORDER, not the replies' order
    for m in s.values():
        assert (m["auroc"], m["tpr_at_1pct_fpr"], m["fpr"]) == (1.0, 1.0, 0.0)
        assert (m["human_texts"], m["machine_texts"], m["non_finite_scores"]) == (3, 2, 0)
        assert "fewer than 100 human texts" in m["fpr_note"]
    assert s["log_rank"]["higher_means_machine"] is False
    assert s["log_rank"]["threshold_oriented"] == -1.8  # the highest human score, oriented
    assert s["log_rank"]["mean_oriented_score"]["machine"] == pytest.approx(-0.7)
    assert "published" not in s["log_rank"]
    # the same records read without orientation would rank log_rank backwards
    assert bench.auroc([0.5, 0.9], [2.0, 1.8, 1.9]) == 0.0


def test_summary_of_a_method_some_replies_lack_and_of_bad_scores() -> None:
    records = [rec("human", -3.0, 2.0, learned=0.2), rec("machine", -1.0, 0.5, learned=0.9)]
    records += [rec("human", float("nan"), 1.0), rec("machine", -1.2, 0.4)]
    s = bench.summarise(records)
    assert list(s) == ["log_likelihood", "log_rank", "learned"]
    assert s["learned"]["human_texts"] == 1 and s["learned"]["auroc"] == 1.0
    assert s["log_likelihood"]["non_finite_scores"] == 1 and s["log_likelihood"]["human_texts"] == 1
    records.append({"label": "human", "scores": {"learned": 0.1}, "higher_means_machine": {"learned": False}})
    with pytest.raises(ValueError, match="disagree"):
        bench.summarise(records)


def test_published_figures_sit_beside_binoculars_and_fast_detectgpt() -> None:
    records = [
        {
            "label": label,
            "scores": {"binoculars": b, "fast_detectgpt": f},
            "higher_means_machine": {"binoculars": False, "fast_detectgpt": True},
        }
        for label, b, f in [("human", 1.0, 0.1), ("machine", 0.8, 2.0)]
    ]
    s = bench.summarise(records)
    assert "2401.12070" in s["binoculars"]["published"]["citation"]
    assert s["binoculars"]["published"]["auroc"] is None  # no figure found: not invented
    assert "2310.05130" in s["fast_detectgpt"]["published"]["citation"]


def test_throughput_ratio_and_the_table() -> None:
    t = bench.throughput(
        {"texts": 10, "tokens": 500, "wall_s": 5.0}, {"texts": 10, "tokens": 500, "wall_s": 2.0}
    )
    assert t["sequential"]["texts_per_s"] == 2.0 and t["concurrent_16"]["tokens_per_s"] == 250.0
    assert t["ratio_concurrent_vs_sequential"] == 2.5
    records = [rec("human", -3.0, 2.0), rec("machine", -1.0, 0.5)]
    result = {
        "config": {"human_count": 1, "machine_count": 1, "model": "m", "observer": None, "address": None},
        "methods": bench.summarise(records),
        "throughput": t | {"max_abs_score_diff_concurrent_vs_sequential": 0.0},
        "machine": {"cpu_model": "cpu", "loadavg_start": [1.0], "loadavg_end": [1.0]},
    }
    text = bench.format_summary(result)
    assert "log_rank" in text and "x2.50" in text and "fewer than 100" in text and "cpu" in text


def test_load_texts(tmp_path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b", "source": "x"}\n{"text": "c"}\n')
    assert bench.load_texts(p) == ["a", "b", "c"] and bench.load_texts(p, limit=2) == ["a", "b"]
    p.write_text('{"text": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2"):
        bench.load_texts(p)


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_parser(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", "detect", "--help"])
    assert e.value.code == 0 and "--observer" in capsys.readouterr().out
    argv = [
        "bench",
        "detect",
        "--human",
        "h.jsonl",
        "--machine",
        "m.jsonl",
        "--out",
        str(tmp_path / "d.json"),
    ]
    args = build_parser().parse_args(argv)
    assert (args.model, args.observer, args.limit, args.address) == (
        "smollm2-135m-instruct",
        "smollm2-135m-instruct-draft",
        None,
        None,
    )
    assert build_parser().parse_args([*argv, "--limit", "5", "--observer", "none"]).limit == 5
    for missing in ("--human", "--machine", "--out"):
        i = argv.index(missing)
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv[:i] + argv[i + 2 :])
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--limit", "0"])


def test_cli_refuses_a_missing_file(tmp_path, capsys) -> None:
    from specmesh.cli.main import main

    code = main(
        ["bench", "detect", "--human", str(tmp_path / "no.jsonl"), "--machine", "m", "--out", "x.json"]
    )
    assert code == 2 and "--human" in capsys.readouterr().err


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scoring_address(tiny_gguf, tmp_path_factory):
    from services.core import model_import as mi
    from services.runtime.settings import ServerSettings
    from services.scoring.server import load_scoring, start_scoring

    root = tmp_path_factory.mktemp("detect-models")
    target = mi.import_gguf(tiny_gguf().path, "tiny", root=root, progress=False, license="apache-2.0")
    observer = mi.import_gguf(tiny_gguf(untied=True).path, "tiny-obs", root=root, progress=False)
    servicer = load_scoring(str(target), observer=str(observer), pack_weights=False)
    servicer.batcher.window_s = 0.02  # wide enough that concurrent calls meet
    with ServerThread(lambda: start_scoring(servicer, ServerSettings(host="127.0.0.1", port=0))) as srv:
        yield srv.address
    servicer.close()


def test_end_to_end_through_a_scoring_service(scoring_address, tmp_path) -> None:
    human, machine = tmp_path / "h.jsonl", tmp_path / "m.jsonl"
    human.write_text(
        "".join(json.dumps({"text": f"the wind in tree {i} is a thin voice"}) + "\n" for i in range(6))
    )
    machine.write_text(
        "".join(json.dumps({"text": f"it is {i} and it is {i} and it is"}) + "\n" for i in range(8))
    )
    out = tmp_path / "detect.json"
    r = bench.run_detect_bench(human, machine, out=out, limit=5, address=scoring_address, progress=False)
    saved = json.loads(out.read_text())
    assert saved["config"]["human_count"] == saved["config"]["machine_count"] == 5
    assert list(saved["methods"]) == ["log_likelihood", "log_rank", "entropy", "binoculars", "fast_detectgpt"]
    for m in saved["methods"].values():
        assert 0.0 <= m["auroc"] <= 1.0 and m["human_texts"] == m["machine_texts"] == 5
        assert m["fpr"] == 0.0 and "fpr_note" in m
    assert saved["methods"]["binoculars"]["higher_means_machine"] is False
    t = saved["throughput"]
    assert (
        t["sequential"]["texts"] == t["concurrent_16"]["texts"] == 10
        and t["ratio_concurrent_vs_sequential"] > 0
    )
    assert t["max_abs_score_diff_concurrent_vs_sequential"] < 1e-3  # batched forwards score the same
    assert len(saved["records"]) == 10 and saved["machine"]["cpu_model"] is not None
    assert r["png"] is None or (tmp_path / "detect.png").stat().st_size > 0
    assert "bench detect: 5 human / 5 machine texts" in bench.format_summary(r)


def test_a_service_that_refuses_is_an_rpc_error(scoring_address, tmp_path) -> None:
    human = tmp_path / "h.jsonl"
    human.write_text(json.dumps({"text": "x" * 100_000}) + "\n")  # beyond the tiny model's context
    with pytest.raises(grpc.RpcError):
        bench.run_detect_bench(human, human, out=tmp_path / "d.json", address=scoring_address, progress=False)
