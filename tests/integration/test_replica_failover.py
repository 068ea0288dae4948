"""Replica failover on real services: two target and two draft service processes on SmolLM2
(the draft an untrained 4-layer slice, so rounds reject as well as accept) behind the real
gateway. The target replica holding a long greedy request is SIGKILLed between rounds, then the
draft replica holding the next one; each request completes on the surviving replica with the
tokens an uninterrupted request produces."""

from __future__ import annotations

import io
import os
import signal
import sys
import time

import grpc
import pytest
from servers import ServerThread

from gateway.server import GatewayOptions, start_gateway
from services.runtime.settings import ServerSettings
from specmesh import stack as supervisor
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
MAX_NEW = 64


def _request() -> gateway_pb2.GatewayGenerateRequest:
    message = common_pb2.ChatMessage(role="user", content="Write a short story about a lighthouse keeper.")
    return gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=[message])),
        sampling=common_pb2.SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True),
        policy=gateway_pb2.POLICY_SPECULATIVE,
    )


def test_sigkilled_target_and_draft_replicas_between_rounds(smollm2_dir, draft_dir) -> None:
    log = io.StringIO()
    sink = supervisor.LogSink(log, color=False)
    cli = [sys.executable, "-m", "specmesh.cli.main", "serve"]
    children: dict[str, list[supervisor.Child]] = {"target": [], "draft": []}
    for role, model in (("target", MODEL), ("draft", str(draft_dir))):
        for _ in range(2):
            port = supervisor.free_port()
            argv = [*cli, role, "--model", model, "--port", str(port), "--threads", "1"]
            children[role].append(
                supervisor.Child(f"{role}-{port}", argv, f"127.0.0.1:{port}", lambda: False)
            )
    every = children["target"] + children["draft"]
    env = dict(os.environ, OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none")
    try:
        for child in every:
            child.start(env, sink)
        deadline = time.monotonic() + 600
        for child in every:
            while not supervisor.grpc_serving(child.address):
                assert child.alive, log.getvalue()
                assert time.monotonic() < deadline, log.getvalue()
                time.sleep(0.25)

        options = GatewayOptions(
            target=[c.address for c in children["target"]], draft=[c.address for c in children["draft"]]
        )
        settings = ServerSettings(host="127.0.0.1", port=0, service_name="gateway", grace_seconds=1)
        with (
            ServerThread(lambda: start_gateway(options, settings)) as gateway,
            grpc.insecure_channel(gateway.address) as channel,
        ):
            stub = gateway_pb2_grpc.GatewayStub(channel)
            uninterrupted = stub.Generate(_request(), timeout=600)
            assert len(uninterrupted.token_ids) == MAX_NEW
            assert uninterrupted.spec_stats.rounds < MAX_NEW  # rounds accepted drafted tokens

            servicer = gateway.server.servicer
            victims, outputs = [], []
            for role in ("target", "draft"):  # one stream loses its target replica, the next its draft
                pool = servicer.pools[role]
                assert pool.moves == 0
                stream = stub.GenerateStream(_request(), timeout=600)
                chunks = [next(stream) for _ in range(3)]
                (holder,) = [r for r in pool.replicas if r.sessions > 0]
                (victim,) = [c for c in children[role] if c.address == holder.address]
                os.kill(victim.proc.pid, signal.SIGKILL)
                chunks += list(stream)
                assert pool.moves == 1, role  # the request's session moved to the survivor mid-request
                victims.append(victim)
                outputs.append(chunks)
        for victim in victims:
            assert victim.proc.wait(timeout=10) == -signal.SIGKILL
        assert all(c.alive for c in every if c not in victims), log.getvalue()
    finally:
        for child in reversed(every):
            child.stop(timeout=15)

    for chunks in outputs:
        assert [t for c in chunks for t in c.token_ids] == list(uninterrupted.token_ids)
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
