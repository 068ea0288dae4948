"""`specmesh detect | membership | uncertainty` on a tiny imported model, in-process and through
a real scoring server (--address): the same numbers either way, tables and JSON that say what the
service returned, bad input in one line."""

from __future__ import annotations

import json

import pytest
from servers import ServerThread

from services.runtime.settings import ServerSettings
from services.scoring.server import load_scoring, start_scoring
from specmesh.cli.main import main

TEXT = "the wind in the trees is a thin, high voice."


@pytest.fixture(scope="module")
def address(tiny_model):
    servicer = load_scoring(tiny_model, pack_weights=False)
    with ServerThread(lambda: start_scoring(servicer, ServerSettings(host="127.0.0.1", port=0))) as srv:
        yield srv.address
    servicer.close()


def _json(argv: list[str], capsys) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _without_timing(out: dict) -> dict:
    return {k: v for k, v in out.items() if k != "total_ms"}


def test_detect(tiny_model, address, capsys) -> None:
    argv = ["detect", "--model", tiny_model, "--text", TEXT]
    local = _json([*argv, "--per-token"], capsys)
    assert local["tokens"] > 5
    methods = {s["method"] for s in local["scores"]}
    assert methods == {"log_likelihood", "log_rank", "entropy", "fast_detectgpt"}  # no observer
    assert all(
        len(s["per_token"]) == local["tokens"] for s in local["scores"] if s["method"] != "fast_detectgpt"
    )
    remote = _json([*argv, "--per-token", "--address", address], capsys)
    assert _without_timing(remote) == _without_timing(local)

    assert main([*argv, "--method", "entropy", "--address", address]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith("detector") and table[2].split()[0] == "entropy" and table[2].endswith("lower")
    assert len(table) == 3


def test_membership_and_uncertainty(tiny_model, address, capsys, tmp_path) -> None:
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    argv = ["membership", "--model", tiny_model, "--file", str(text_file), "--method", "min_k"]
    local = _json([*argv, "--k-fraction", "0.5"], capsys)
    assert [s["method"] for s in local["scores"]] == ["min_k"]
    assert _without_timing(_json([*argv, "--k-fraction", "0.5", "--address", address], capsys)) == (
        _without_timing(local)
    )

    argv = ["uncertainty", "--model", tiny_model, "--text", TEXT, "--start", "2"]
    local = _json(argv, capsys)
    assert all(0 < t["probability"] <= 1 and t["entropy"] >= 0 for t in local["tokens"])
    assert _without_timing(_json([*argv, "--address", address], capsys)) == _without_timing(local)
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[0] == "2" and len(table) == len(local["tokens"]) + 2
    assert table[-1].startswith("geometric mean p")


def test_bad_input_is_one_line(tiny_model, address, capsys, tmp_path) -> None:
    assert main(["uncertainty", "--model", tiny_model, "--text", "", "--address", address]) == 2
    assert capsys.readouterr().err.strip().startswith("specmesh uncertainty: INVALID_ARGUMENT: input")
    with pytest.raises(SystemExit, match="cannot read --file"):
        main(["detect", "--file", str(tmp_path / "missing.txt"), "--address", address])
