"""One request, three processes (toy target, toy draft, real gateway), one trace.

Each process exports its spans with OTEL_TRACES_EXPORTER=file:PATH into one shared file; the
trace context travels in gRPC metadata from the gateway to both services.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

import grpc

from specmesh import stack as supervisor
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def test_one_trace_across_processes(toy, tmp_path) -> None:
    spans_file = tmp_path / "spans.jsonl"
    env = dict(os.environ, OTEL_TRACES_EXPORTER=f"file:{spans_file}", OTEL_METRICS_EXPORTER="none")
    env.pop("OTEL_SERVICE_NAME", None)
    log = io.StringIO()
    sink = supervisor.LogSink(log, color=False)
    ports = {name: supervisor.free_port() for name in ("target", "draft", "gateway")}
    addr = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    script = str(toy.services_script)
    children = [
        supervisor.Child(
            name,
            [sys.executable, script, name, "--port", str(ports[name]), "--tokenizer", str(toy.tokenizer_dir)],
            addr[name],
            lambda: False,
        )
        for name in ("target", "draft")
    ]
    children.append(
        supervisor.Child(
            "gateway",
            [
                sys.executable,
                "-m",
                "specmesh.cli.serve_gateway",
                "--target",
                addr["target"],
                "--draft",
                addr["draft"],
            ]
            + ["--model", str(toy.tokenizer_dir), "--port", str(ports["gateway"])],
            addr["gateway"],
            lambda: False,
        )
    )
    try:
        for child in children:
            child.start(env, sink)
        deadline = time.monotonic() + 60
        for child in children:
            while not supervisor.grpc_serving(child.address):
                assert child.alive, log.getvalue()
                assert time.monotonic() < deadline, log.getvalue()
                time.sleep(0.05)
        with grpc.insecure_channel(addr["gateway"]) as channel:
            chunks = list(
                gateway_pb2_grpc.GatewayStub(channel).GenerateStream(
                    gateway_pb2.GatewayGenerateRequest(
                        prompt=common_pb2.Prompt(text="w5 w9 w11"),
                        sampling=common_pb2.SamplingParams(max_new_tokens=12, ignore_eos=True),
                    ),
                    timeout=60,
                )
            )
        time.sleep(0.5)  # the gateway releases the sessions in the background
    finally:
        for child in reversed(children):
            child.stop(timeout=10)
    rounds = chunks[-1].spec_stats.rounds
    spans = [json.loads(line) for line in spans_file.read_text().splitlines() if line.strip()]
    by_service: dict[str, list[dict]] = {}
    for sp in spans:
        by_service.setdefault(sp["resource"]["attributes"]["service.name"], []).append(sp)
    assert set(by_service) == {"specmesh-gateway", "toy-target", "toy-draft"}, log.getvalue()
    trace_ids = {sp["context"]["trace_id"] for sp in spans}
    assert len(trace_ids) == 1, sorted((sp["name"], sp["context"]["trace_id"]) for sp in spans)

    def names(service: str, kind: str) -> list[str]:
        return [sp["name"] for sp in by_service[service] if sp["kind"] == f"SpanKind.{kind}"]

    assert names("specmesh-gateway", "SERVER") == ["/specmesh.v1.Gateway/GenerateStream"]
    assert names("toy-draft", "SERVER").count("/specmesh.v1.DraftService/Propose") == rounds
    assert names("toy-target", "SERVER").count("/specmesh.v1.TargetService/Verify") == rounds
    assert "/specmesh.v1.TargetService/Release" in names("toy-target", "SERVER")
    assert "/specmesh.v1.DraftService/Release" in names("toy-draft", "SERVER")
    gw = {sp["context"]["span_id"]: sp for sp in by_service["specmesh-gateway"]}
    (request_span,) = [sp for sp in gw.values() if sp["name"] == "specmesh.generate"]
    server_span = next(sp for sp in gw.values() if sp["kind"] == "SpanKind.SERVER")
    assert request_span["parent_id"] == server_span["context"]["span_id"]
    rounds_spans = [sp for sp in gw.values() if sp["name"] == "specmesh.round"]
    assert len(rounds_spans) == rounds
    assert all(sp["parent_id"] == request_span["context"]["span_id"] for sp in rounds_spans)
    for service, method in (("toy-draft", "Propose"), ("toy-target", "Verify")):
        for sp in by_service[service]:
            if sp["name"].endswith(f"/{method}"):
                client = gw[sp["parent_id"]]  # the gateway's client span ...
                assert gw[client["parent_id"]]["name"] == "specmesh.round"  # ... inside a round
    a = request_span["attributes"]
    assert a["gen_ai.usage.output_tokens"] == 12 and a["gen_ai.usage.input_tokens"] == 3
    assert a["gen_ai.request.model"] == "toy-target" and a["specmesh.policy"] == "speculative"
