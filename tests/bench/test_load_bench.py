"""bench load's pure parts: the level summary, percentiles, the gain, the sweep and the CLI."""

from __future__ import annotations

import pytest

from bench.load.config import LoadBenchConfig
from bench.load.stats import Stream, gain, percentile, summarize_level
from specmesh.cli.main import build_parser


def test_percentile_interpolates_between_closest_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == 99.0


def test_level_summary_counts_errors_and_times_tokens() -> None:
    streams = [
        Stream("target", 10, start=0.0, first=0.5, last=2.5, end=2.5, tokens=5),  # 0.5 s/token
        Stream("speculative", 30, start=1.0, first=1.2, last=2.2, end=4.0, tokens=11, cut=True),
        Stream("target", 10, start=1.0, end=1.1, error="RESOURCE_EXHAUSTED"),
    ]
    s = summarize_level(8, streams, elapsed_s=4.0)
    assert (s["requests"], s["errors"], s["error_codes"]) == (3, 1, {"RESOURCE_EXHAUSTED": 1})
    assert (s["completed"], s["cut_at_end"]) == (1, 1)
    assert s["output_tokens"] == 16 and s["tokens_per_s"] == 4.0
    assert s["ttft_ms"] == {"p50": 350.0, "p99": 497.0}
    assert s["per_token_ms"]["p50"] == 300.0
    assert s["by_policy"] == {"speculative": 11, "target": 5}


def test_gain_is_a_ratio_of_levels_of_one_run() -> None:
    levels = [{"concurrency": 1, "tokens_per_s": 10.0}, {"concurrency": 8, "tokens_per_s": 31.0}]
    assert gain(levels, 8) == 3.1
    assert gain(levels, 32) is None
    assert gain([{"concurrency": 1, "tokens_per_s": 0.0}, *levels[1:]], 8) is None


def test_sweep_ends_at_the_requested_concurrency_and_bad_values_are_refused(tmp_path) -> None:
    assert LoadBenchConfig(out=tmp_path / "x.json").levels == (1, 8, 32)
    assert LoadBenchConfig(out=tmp_path / "x.json", concurrency=4).levels == (1, 4)
    assert LoadBenchConfig(out=tmp_path / "x.json", concurrency=1).levels == (1,)
    with pytest.raises(ValueError, match="batching"):
        LoadBenchConfig(out=tmp_path / "x.json", batching="sometimes")


def test_cli_parses_the_documented_example(tmp_path) -> None:
    args = build_parser().parse_args(
        ["bench", "load", "--concurrency", "32", "--duration", "60", "--out", str(tmp_path / "load.json")]
    )
    assert (args.concurrency, args.duration, args.batching) == (32, 60.0, "both")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "load", "--concurrency", "0", "--out", "x.json"])
