"""The gateway serves without torch and without a model directory: `specmesh serve gateway` in a
process where `import torch` fails and `SPECMESH_MODEL_DIR` is an empty directory, in front of
real target and draft service processes on SmolLM2. It gets the tokenizer and chat template from
the target (TargetService.GetTokenizer).

A `torch` package that raises ImportError sits first on the gateway's PYTHONPATH, so any import
of torch on the gateway's path (module level or inside a function it calls) fails the request or
the start-up. Its greedy speculative output must equal the target service's own greedy output.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from specmesh import stack as supervisor
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, target_pb2, target_pb2_grpc

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
MAX_NEW = 24
BLOCKED = "torch is blocked in this process (tests/integration/test_gateway_without_torch.py)"


def _prompt() -> common_pb2.Prompt:
    message = common_pb2.ChatMessage(role="user", content="What is the capital of France? One sentence.")
    return common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=[message]))


def _no_torch_env(tmp_path: Path) -> dict[str, str]:
    blocker = tmp_path / "no-torch"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text(f"raise ImportError({BLOCKED!r})\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(blocker), env.get("PYTHONPATH")) if p)
    return env


def test_gateway_serves_without_torch(smollm2_dir, tmp_path: Path) -> None:
    no_torch = _no_torch_env(tmp_path)
    # the block works: `import torch` fails in that environment (and works in ours)
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], env=no_torch, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode != 0 and BLOCKED in probe.stderr, probe.stderr

    log = io.StringIO()
    sink = supervisor.LogSink(log, color=False)
    ports = {name: supervisor.free_port() for name in ("target", "draft", "gateway")}
    addr = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    cli = [sys.executable, "-m", "specmesh.cli.main", "serve"]
    services = [
        supervisor.Child(
            name,
            [*cli, name, "--model", MODEL, "--port", str(ports[name]), "--threads", "1"],
            addr[name],
            lambda: False,
        )
        for name in ("target", "draft")
    ]
    gateway = supervisor.Child(
        "gateway",
        [*cli, "gateway", "--target", addr["target"], "--draft", addr["draft"]]
        + ["--port", str(ports["gateway"])],
        addr["gateway"],
        lambda: False,
    )
    env = dict(os.environ, OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none")
    empty_models = tmp_path / "no-models"
    empty_models.mkdir()
    no_torch.update(
        OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none", SPECMESH_MODEL_DIR=str(empty_models)
    )
    children = [*services, gateway]
    try:
        for child in services:
            child.start(env, sink)
        gateway.start(no_torch, sink)
        deadline = time.monotonic() + 600
        for child in children:
            while not supervisor.grpc_serving(child.address):
                assert child.alive, log.getvalue()
                assert time.monotonic() < deadline, log.getvalue()
                time.sleep(0.25)

        sampling = common_pb2.SamplingParams(max_new_tokens=MAX_NEW)
        with grpc.insecure_channel(addr["target"]) as channel:
            chunks = target_pb2_grpc.TargetServiceStub(channel).Generate(
                target_pb2.GenerateRequest(prompt=_prompt(), sampling=sampling), timeout=300
            )
            target_only = [t for c in chunks for t in c.token_ids]
        assert len(target_only) > 0

        with grpc.insecure_channel(addr["gateway"]) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            spec = stub.Generate(
                gateway_pb2.GatewayGenerateRequest(
                    prompt=_prompt(), sampling=sampling, policy=gateway_pb2.POLICY_SPECULATIVE
                ),
                timeout=600,
            )
            streamed = list(
                stub.GenerateStream(
                    gateway_pb2.GatewayGenerateRequest(
                        prompt=_prompt(), sampling=sampling, policy=gateway_pb2.POLICY_TARGET
                    ),
                    timeout=600,
                )
            )
        assert gateway.alive, log.getvalue()
    finally:
        for child in reversed(children):
            child.stop(timeout=15)

    assert list(spec.token_ids) == target_only, log.getvalue()
    assert spec.spec_stats.rounds >= 1 and spec.text  # it went through draft and verify rounds
    assert [t for c in streamed for t in c.token_ids] == target_only
    assert BLOCKED not in log.getvalue()
    assert not any(empty_models.iterdir())  # the gateway built no model directory either
