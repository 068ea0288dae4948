"""specmesh.stack, the library side of `specmesh up` / `quickstart` (the processes: tests/integration)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specmesh import stack


def test_ensure_default_models_trains_a_missing_draft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import services.core.model_import as mi

    calls: list[list[str]] = []
    monkeypatch.setattr(mi, "ensure_default_model", lambda: tmp_path / stack.DEFAULT_MODEL)
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    monkeypatch.setenv("SPECMESH_MODEL_DIR", str(tmp_path))
    stack.ensure_default_models(2.5)
    assert len(calls) == 1 and calls[0][-5:] == ["specmesh.cli.main", "train", "draft", "--minutes", "2.5"]

    draft = tmp_path / stack.DEFAULT_DRAFT_MODEL
    draft.mkdir()
    (draft / "config.json").write_text("{}")
    stack.ensure_default_models(2.5)  # present now: nothing to train
    assert len(calls) == 1


def test_wait_returns_the_child_that_exits() -> None:
    import io
    import os
    import sys

    sink = stack.LogSink(io.StringIO(), color=False)
    local = stack.LocalStack(stack.StackConfig(), sink)
    quits = stack.Child("quits", [sys.executable, "-c", "raise SystemExit(3)"], "-", lambda: True)
    stays = stack.Child("stays", [sys.executable, "-c", "import time; time.sleep(60)"], "-", lambda: True)
    local.children = [stays, quits]
    try:
        for child in local.children:
            child.start(dict(os.environ), sink)
        assert local.wait(poll=0.05) is quits and quits.proc.returncode == 3
        assert stays.alive
    finally:
        local.kill()
        for child in local.children:
            child.stop(timeout=5)


def _state(pid: int) -> str | None:
    """The process state letter of `pid` (Z = zombie), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_die_with_a_sigkilled_parent() -> None:
    """What `specmesh up` leaves when the OOM killer or SIGKILL takes it: no running children."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, time\n"
            "from specmesh.stack import Child, LogSink\n"
            "c = Child('sleeper', ['sleep', '120'], '', lambda: False)\n"
            "c.start(dict(os.environ), LogSink())\n"
            "print(c.proc.pid, flush=True)\n"
            "time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(parent.stdout.readline())
    assert _state(child) not in (None, "Z")  # running (or sleeping)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _state(child) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(child) in (None, "Z"), "the child outlived its SIGKILLed parent"
