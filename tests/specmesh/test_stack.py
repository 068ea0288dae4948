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


def _planned(*flags: str) -> stack.LocalStack:
    """The children `specmesh up FLAGS --no-redis` would start (planned, nothing started)."""
    from deploy_tools import parse_cli

    from specmesh.cli.up import config_from_args

    local = stack.LocalStack(config_from_args(parse_cli(["up", "--no-redis", *flags])))
    local.children = local._plan()
    return local


def _metrics_ports(local: stack.LocalStack) -> dict[str, int | None]:
    """Each child's Prometheus port as its own `serve` command resolves it (the real parser)."""
    from deploy_tools import parse_cli, up_argv_to_cli

    from services.runtime.settings import ServerSettings

    return {
        c.name: ServerSettings.from_env_and_args(parse_cli(up_argv_to_cli(c.argv)), env={}).metrics_port
        for c in local.children
    }


def test_up_metrics_gives_every_service_its_own_endpoint() -> None:
    from specmesh.cli.up import summary

    local = _planned("--metrics")  # a free port each
    ports = _metrics_ports(local)
    grpc_ports = {int(c.address.rsplit(":", 1)[1]) for c in local.children}
    assert set(ports) == {"target", "draft", "gateway"} and 0 not in ports.values()
    assert len(set(ports.values())) == 3 and not grpc_ports & set(ports.values())
    text = summary(local)
    for child in local.children:
        assert child.metrics_url == f"http://127.0.0.1:{ports[child.name]}/metrics"
        assert f"{child.address}  metrics {child.metrics_url}" in text
    # a base port: fixed offsets in start order, so a scrape config can name them
    assert _metrics_ports(_planned("--metrics", "19464")) == {
        "target": 19464,
        "draft": 19465,
        "gateway": 19466,
    }
    assert _metrics_ports(_planned("--metrics", "19464", "--no-draft"))["gateway"] == 19466
    assert _metrics_ports(_planned("--metrics", "19464", "--scoring"))["scoring"] == 19467
    assert _metrics_ports(_planned("--metrics", "19464", "--image"))["image"] == 19468
    # off by default: no flag, no URL
    local = _planned()
    assert set(_metrics_ports(local).values()) == {None} and "metrics" not in summary(local)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--metrics", "65532"], "--metrics must be in 1..65531"),
        (["--metrics", "-1"], "--metrics must be in 1..65531"),
        (["--metrics", "9000", "--image-port", "9004"], "9004 is already a service port"),
        (["--metrics", "50048"], "50050 is already a service port"),  # the gateway's default port
        (["--metrics", "9000", "--target-port", "9001"], "9001 is already a service port"),
    ],
)
def test_up_metrics_ports_are_checked_before_anything_starts(flags: list[str], message: str) -> None:
    from deploy_tools import parse_cli

    from specmesh.cli.up import config_from_args

    with pytest.raises(stack.StackError, match=message):
        config_from_args(parse_cli(["up", *flags]))


def test_up_scoring_starts_a_scoring_service_the_gateway_relays() -> None:
    from deploy_tools import parse_cli, up_argv_to_cli

    from specmesh.cli.up import summary

    assert "scoring" not in {c.name for c in _planned().children}  # off by default
    local = _planned("--scoring", "--scoring-port", "19470")
    children = {c.name: c for c in local.children}
    scoring = parse_cli(up_argv_to_cli(children["scoring"].argv))
    assert (scoring.model, scoring.observer, scoring.port) == (
        stack.DEFAULT_MODEL,
        stack.DEFAULT_DRAFT_MODEL,  # Binoculars' observer: the draft, same tokenizer
        19470,
    )
    gateway = parse_cli(up_argv_to_cli(children["gateway"].argv))
    assert gateway.scoring == children["scoring"].address == "127.0.0.1:19470"
    assert "scoring  127.0.0.1:19470" in summary(local) and "specmesh detect --address" in summary(local)
    no_draft = {c.name: c for c in _planned("--scoring", "--no-draft").children}
    assert parse_cli(up_argv_to_cli(no_draft["scoring"].argv)).observer is None


def test_up_image_starts_an_image_service_the_gateway_relays() -> None:
    from deploy_tools import parse_cli, up_argv_to_cli

    from services.image.store import DEFAULT_NAME
    from specmesh.cli.up import summary

    assert stack.DEFAULT_IMAGE_MODEL == DEFAULT_NAME  # the name `up` checks is the one served
    assert "image" not in {c.name for c in _planned().children}  # off by default
    local = _planned("--image", "--image-port", "19471")
    children = {c.name: c for c in local.children}
    image = parse_cli(up_argv_to_cli(children["image"].argv))
    # the default model directory (<model root>/digits-image): what `specmesh train image` writes
    assert (image.command, image.service, image.model_dir, image.port) == ("serve", "image", None, 19471)
    gateway = parse_cli(up_argv_to_cli(children["gateway"].argv))
    assert gateway.image == children["image"].address == "127.0.0.1:19471"
    assert gateway.scoring is None
    text = summary(local)
    assert "image  127.0.0.1:19471" in text
    assert f"specmesh image generate --address {local.gateway}" in text and "specmesh detect" not in text


def test_up_image_without_image_models_says_how_to_build_them(tmp_model_root) -> None:
    local = stack.LocalStack(stack.StackConfig(image=True, ensure_models=False))
    with pytest.raises(stack.StackError, match="specmesh train image") as info:
        local._check_models()
    assert str(tmp_model_root / stack.DEFAULT_IMAGE_MODEL) in str(info.value)


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


def test_up_target_weights_reach_the_target_command() -> None:
    from deploy_tools import parse_cli, up_argv_to_cli

    def target_weights(*flags: str) -> str:
        children = {c.name: c for c in _planned(*flags).children}
        return parse_cli(up_argv_to_cli(children["target"].argv)).weights

    assert target_weights() == "fp32"
    assert target_weights("--target-weights", "q4_1") == "q4_1"
    from specmesh.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--target-weights", "int3"])
