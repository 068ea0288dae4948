"""The real stack on loopback: target, draft and gateway as separate processes on SmolLM2.

The draft is the target model itself unless SPECMESH_TEST_DRAFT_MODEL names another (e.g. the
trained smollm2-135m-instruct-draft): a model drafting for itself must be accepted on (almost)
every greedy token, and whatever the draft, greedy speculative output must equal target-only
output token for token. No timing assertions.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from specmesh import stack as supervisor
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
STRATEGIES = [
    common_pb2.DRAFT_STRATEGY_CHAIN,
    common_pb2.DRAFT_STRATEGY_STATIC_TREE,
    common_pb2.DRAFT_STRATEGY_DYNAMIC_TREE,
    common_pb2.DRAFT_STRATEGY_MULTI_CANDIDATE,
    common_pb2.DRAFT_STRATEGY_PROMPT_LOOKUP,
]
PROMPTS = [
    ("chat", "What is the capital of France? Answer in one sentence."),
    ("text", "def fibonacci(n):\n    "),
]
MAX_NEW = 24


def draft_model() -> str:
    return os.environ.get("SPECMESH_TEST_DRAFT_MODEL", MODEL)


@pytest.fixture(scope="module")
def draft_service_available() -> None:
    probe = subprocess.run(
        [sys.executable, "-m", "specmesh.cli.main", "serve", "draft", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        pytest.skip("`specmesh serve draft` is not available yet")


def stack_config(**overrides) -> supervisor.StackConfig:
    base = dict(
        model=MODEL,
        draft_model=draft_model(),
        gateway_port=0,
        redis=False,
        target_threads=1,
        draft_threads=1,
        draft_int8=False,  # fp32: a model drafting for itself then proposes the target's argmax
        startup_timeout=300,
        warmup=False,
    )
    base.update(overrides)
    return supervisor.StackConfig(**base)


def prompt(kind: str, text: str) -> common_pb2.Prompt:
    if kind == "chat":
        return common_pb2.Prompt(
            chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=text)])
        )
    return common_pb2.Prompt(text=text)


def request(kind, text, policy, strategy=0, lookup=None, **sampling) -> gateway_pb2.GatewayGenerateRequest:
    """lookup: the budget's lookup_tokens (None = the gateway's default)."""
    sampling.setdefault("max_new_tokens", MAX_NEW)
    return gateway_pb2.GatewayGenerateRequest(
        prompt=prompt(kind, text),
        sampling=common_pb2.SamplingParams(**sampling),
        policy=policy,
        spec=gateway_pb2.SpecOptions(strategy=strategy, budget=common_pb2.TreeBudget(lookup_tokens=lookup)),
    )


@pytest.fixture(scope="module")
def stack(smollm2_dir, draft_service_available):
    with supervisor.LocalStack(stack_config(), supervisor.LogSink(sys.stderr, color=False)) as s:
        channel = grpc.insecure_channel(s.gateway)
        yield gateway_pb2_grpc.GatewayStub(channel)
        channel.close()


@pytest.fixture(scope="module")
def target_only(stack) -> dict[str, list[int]]:
    out = {}
    for kind, text in PROMPTS:
        r = stack.Generate(request(kind, text, gateway_pb2.POLICY_TARGET), timeout=300)
        out[text] = list(r.token_ids)
    return out


@pytest.mark.parametrize("strategy", STRATEGIES, ids=common_pb2.DraftStrategy.Name)
def test_greedy_speculative_equals_target_only(stack, target_only, strategy) -> None:
    for kind, text in PROMPTS:
        r = stack.Generate(request(kind, text, gateway_pb2.POLICY_SPECULATIVE, strategy), timeout=600)
        assert list(r.token_ids) == target_only[text], (kind, text)
        if draft_model() == MODEL and strategy == common_pb2.DRAFT_STRATEGY_CHAIN:
            # without the prompt-lookup path, whose nodes off the draft's own path are rejected
            r = stack.Generate(request(kind, text, gateway_pb2.POLICY_SPECULATIVE, strategy, 0), timeout=600)
            assert list(r.token_ids) == target_only[text], (kind, text)
        s = r.spec_stats
        assert s.rounds >= 1 and r.usage.output_tokens == len(r.token_ids)
        if draft_model() == MODEL and strategy == common_pb2.DRAFT_STRATEGY_CHAIN:
            # a model drafting for itself: greedy drafts are the target's argmax
            assert s.acceptance_rate >= 0.9, s
            assert s.mean_accepted_length > 3.0, s


def test_adaptive_and_stream(stack, target_only) -> None:
    kind, text = PROMPTS[0]
    req = request(kind, text, gateway_pb2.POLICY_SPECULATIVE)
    req.spec.adaptive = True
    chunks = list(stack.GenerateStream(req, timeout=600))
    assert [t for c in chunks for t in c.token_ids] == target_only[text]
    assert chunks[-1].finish_reason and chunks[-1].spec_stats.rounds >= 1


def test_draft_policy_and_sampling(stack) -> None:
    kind, text = PROMPTS[0]
    r = stack.Generate(request(kind, text, gateway_pb2.POLICY_DRAFT, max_new_tokens=12), timeout=300)
    assert 1 <= r.usage.output_tokens <= 12 and r.text
    sampled = request(kind, text, gateway_pb2.POLICY_SPECULATIVE, temperature=0.8, top_p=0.95, seed=11)
    a = stack.Generate(sampled, timeout=600)
    b = stack.Generate(sampled, timeout=600)
    assert list(a.token_ids) == list(b.token_ids) and a.usage.seed == 11  # same seed, same tokens


def test_bad_request_keeps_the_stack_serving(stack) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stack.Generate(request("text", "hi", gateway_pb2.POLICY_SPECULATIVE, max_new_tokens=100_000))
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    r = stack.Generate(request("text", "hi", gateway_pb2.POLICY_SPECULATIVE, max_new_tokens=2), timeout=300)
    assert r.usage.output_tokens >= 1


def test_one_trace_across_three_processes(smollm2_dir, draft_service_available, tmp_path: Path) -> None:
    spans_file = tmp_path / "spans.jsonl"
    env = {"OTEL_TRACES_EXPORTER": f"file:{spans_file}", "OTEL_METRICS_EXPORTER": "none"}
    with supervisor.LocalStack(stack_config(env=env), supervisor.LogSink(sys.stderr, color=False)) as s:
        with grpc.insecure_channel(s.gateway) as channel:
            chunks = list(
                gateway_pb2_grpc.GatewayStub(channel).GenerateStream(
                    request(*PROMPTS[0], gateway_pb2.POLICY_SPECULATIVE, max_new_tokens=8), timeout=600
                )
            )
        rounds = chunks[-1].spec_stats.rounds
        time.sleep(1.0)  # background session releases
    spans = [json.loads(line) for line in spans_file.read_text().splitlines() if line.strip()]
    assert spans
    trace_ids = {sp["context"]["trace_id"] for sp in spans}
    assert len(trace_ids) == 1, f"{len(trace_ids)} traces: {sorted({sp['name'] for sp in spans})}"
    services = {sp["resource"]["attributes"]["service.name"] for sp in spans}
    assert {"specmesh-gateway", "specmesh-target"} <= services and len(services) >= 3, services
    names = [sp["name"] for sp in spans]
    assert names.count("specmesh.generate") == 1
    round_spans = [sp for sp in spans if sp["name"] == "specmesh.round"]
    assert len(round_spans) == rounds
    wanted = {"specmesh.round", "specmesh.spec.accepted_len", "specmesh.spec.drafted"}
    for sp in round_spans:
        assert wanted <= set(sp["attributes"])

    def server_spans(method: str) -> list[dict]:
        return [sp for sp in spans if sp["name"] == method and sp["kind"] == "SpanKind.SERVER"]

    assert len(server_spans("/specmesh.v1.Gateway/GenerateStream")) == 1
    assert len(server_spans("/specmesh.v1.DraftService/Propose")) == rounds
    assert len(server_spans("/specmesh.v1.TargetService/Verify")) == rounds
    request_span = next(sp for sp in spans if sp["name"] == "specmesh.generate")
    attrs = request_span["attributes"]
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.usage.output_tokens"] == sum(len(c.token_ids) for c in chunks)
    assert attrs["gen_ai.usage.input_tokens"] == chunks[-1].usage.prompt_tokens


def cli(module: str) -> list[str]:
    """Run one specmesh.cli module's subcommand (independent of its registration in main.py)."""
    script = (
        "import argparse, sys\n"
        f"from specmesh.cli import {module} as m\n"
        "p = argparse.ArgumentParser(); m.add_parser(p.add_subparsers())\n"
        "args = p.parse_args(sys.argv[1:])\n"
        "sys.exit(args.func(args))\n"
    )
    return [sys.executable, "-c", script]


def test_up_and_generate_commands(smollm2_dir, draft_service_available, tmp_path: Path) -> None:
    """`specmesh up` in its own process, `specmesh generate` against it, its services' /metrics
    scraped from the URLs the summary lists, then Ctrl-C stops everything."""
    port = supervisor.free_port()
    argv = [*cli("up"), "up", "--port", str(port), "--draft-model", draft_model(), "--metrics"]
    argv += ["--target-threads", "1", "--draft-threads", "1", "--startup-timeout", "300"]
    log = tmp_path / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            address = f"127.0.0.1:{port}"
            deadline = time.monotonic() + 600
            # the summary comes once every service serves and the gateway answered ListModels
            while "Ctrl-C stops everything" not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
            gen = subprocess.run(
                [*cli("generate"), "generate", "--gateway", address]
                + ["--prompt", "What is the capital of France?", "--max-new-tokens", "16"],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert gen.returncode == 0, gen.stderr
            assert gen.stdout.strip() and "tokens/s" in gen.stderr and "tau" in gen.stderr
            summary = re.findall(
                r"^ *(target|draft|gateway)  \S+  metrics (http://\S+)$", log.read_text(), re.M
            )
            assert {name for name, _ in summary} == {"target", "draft", "gateway"}, log.read_text()
            urls = dict(summary)
            for name in ("gateway", "target"):  # both served the request just made
                with urllib.request.urlopen(urls[name], timeout=10) as reply:
                    assert "rpc_server_duration_milliseconds_count{" in reply.read().decode(), name
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
    text = log.read_text()
    assert code == 0, text
    for name in ("redis", "target", "draft", "gateway"):
        assert f"{name:>7} | " in text, name
    assert "specmesh stack is up" in text and "stopping" in text
    assert not supervisor.grpc_serving(f"127.0.0.1:{port}", timeout=1)
