"""`specmesh attribute` in-process on a tiny imported model: the table and the JSON say what the
service returned (one importance per context token per target token)."""

from __future__ import annotations

import json

from specmesh.cli.main import main


def test_table_and_json(tiny_model, capsys) -> None:
    argv = ["attribute", "--model", tiny_model, "--no-chat", "--prompt", "the wind"]
    assert main([*argv, "--max-new-tokens", "2", "--top", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("context: ") and "replacements from tiny" in table[0]
    assert [line.split()[0] for line in table[2:4]] == ["0", "1"] and "soft comprehensiveness" in table[-1]

    assert main([*argv, "--target", " in the", "--method", "gradient_x_input", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "gradient_x_input" and out["replacement_model"] is None
    assert "".join(t["text"] for t in out["target"]) == " in the"
    assert all(len(a["importance"]) == len(out["context"]) for a in out["attributions"])


def test_bad_input_is_one_line(tiny_model, capsys) -> None:
    argv = ["attribute", "--model", tiny_model, "--replace-ratio", "101"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "specmesh attribute: must be in [1, 100] (0 = default 30), got 101"
    )
