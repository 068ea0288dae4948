"""A gateway replica SIGKILLed mid-stream: the client resumes on another gateway process with
its session id and the count of tokens it received, and gets exactly the tokens an uninterrupted
stream produces (greedy, and sampled with a seed). Real processes: a SmolLM2 target, a draft (an
untrained 4-layer slice), a Valkey server holding the request records, two gateways."""

from __future__ import annotations

import io
import os
import signal
import sys
import time

import grpc
import pytest
from redis_server import RedisServer

from specmesh import stack as supervisor
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
MAX_NEW = 48


def _request(**sampling) -> gateway_pb2.GatewayGenerateRequest:
    message = common_pb2.ChatMessage(role="user", content="Describe a walk through a forest in autumn.")
    return gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=[message])),
        sampling=common_pb2.SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, **sampling),
        policy=gateway_pb2.POLICY_SPECULATIVE,
    )


def test_sigkilled_gateway_stream_resumes_on_another(smollm2_dir, draft_dir) -> None:
    log = io.StringIO()
    sink = supervisor.LogSink(log, color=False)
    redis = RedisServer().start()
    cli = [sys.executable, "-m", "specmesh.cli.main", "serve"]
    ports = {name: supervisor.free_port() for name in ("target", "draft", "gw0", "gw1")}
    addr = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    services = [
        supervisor.Child(
            role,
            [*cli, role, "--model", model, "--port", str(ports[role]), "--threads", "1"],
            addr[role],
            lambda: False,
        )
        for role, model in (("target", MODEL), ("draft", str(draft_dir)))
    ]
    gateways = [
        supervisor.Child(
            name,
            [
                *cli,
                "gateway",
                "--target",
                addr["target"],
                "--draft",
                addr["draft"],
                "--port",
                str(ports[name]),
            ]
            + ["--redis-url", redis.url],
            addr[name],
            lambda: False,
        )
        for name in ("gw0", "gw1")
    ]
    env = dict(os.environ, OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none")
    results = {}
    try:
        for child in [*services, *gateways]:
            child.start(env, sink)
        deadline = time.monotonic() + 600
        for child in [*services, *gateways]:
            while not supervisor.grpc_serving(child.address):
                assert child.alive, log.getvalue()
                assert time.monotonic() < deadline, log.getvalue()
                time.sleep(0.25)
        with grpc.insecure_channel(addr["gw0"]) as c0, grpc.insecure_channel(addr["gw1"]) as c1:
            first, second = gateway_pb2_grpc.GatewayStub(c0), gateway_pb2_grpc.GatewayStub(c1)
            for name, sampling in (("sampled", dict(temperature=0.8, seed=1234)), ("greedy", {})):
                whole = second.Generate(_request(**sampling), timeout=600)
                stream = first.GenerateStream(_request(**sampling), timeout=600)
                chunks = [next(stream) for _ in range(3)]
                received = [t for c in chunks for t in c.token_ids]
                results[name] = (whole, chunks, received)
                if name == "sampled":  # the first gateway dies; the greedy case uses the second only
                    os.kill(gateways[0].proc.pid, signal.SIGKILL)
                    assert gateways[0].proc.wait(timeout=10) == -signal.SIGKILL
                    first = second
                else:
                    stream.cancel()  # the client goes away instead
                resume = gateway_pb2.GatewayGenerateRequest(
                    session_id=chunks[0].session_id, resume_from=len(received)
                )
                rest = list(second.GenerateStream(resume, timeout=600))
                results[name] += (rest,)
        assert all(c.alive for c in [*services, gateways[1]]), log.getvalue()
    finally:
        for child in reversed([*services, *gateways]):
            child.stop(timeout=15)
        redis.kill()

    for name, (whole, _chunks, received, rest) in results.items():
        assert 0 < len(received) < MAX_NEW, name
        tokens = received + [t for c in rest for t in c.token_ids]
        assert tokens == list(whole.token_ids), name
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH, name
    # sampled output differs from greedy: the seed, not the argmax, decided it
    assert results["sampled"][0].token_ids != results["greedy"][0].token_ids
