"""Telemetry: server spans per RPC, trace propagation through aio_channel, RPC metrics, exporters."""

import asyncio
import gc
import json
import logging
import subprocess
import sys
import textwrap
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import SpanKind

from services.runtime.server import aio_channel, serve
from services.runtime.telemetry import RPC_DURATION_METRIC, TelemetryConfigError, setup_telemetry


@pytest.fixture
def memory_telemetry():
    telemetry = setup_telemetry("probe-svc", "memory", "memory", install_global=False)
    yield telemetry
    telemetry.shutdown()


def server_spans(telemetry, name):
    return [s for s in telemetry.finished_spans() if s.kind == SpanKind.SERVER and s.name == name]


def test_server_span_per_rpc_and_duration_metric(arun, probe, memory_telemetry):
    async def main():
        async with (
            await serve(
                probe.make_register(probe.make_state()), probe.settings(), telemetry=memory_telemetry
            ) as running,
            grpc.aio.insecure_channel(running.address) as channel,
        ):
            for _ in range(2):
                await channel.unary_unary(probe.method("Echo"))(b"hi", timeout=5)
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary(probe.method("Fail"))(b"invalid", timeout=5)
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary(probe.method("Fail"))(b"runtime", timeout=5)
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

    arun(main())
    t = memory_telemetry
    echo = server_spans(t, probe.method("Echo"))
    assert len(echo) == 2
    assert echo[0].attributes["rpc.method"] == "Echo"
    assert echo[0].attributes["rpc.service"] == probe.SERVICE
    assert echo[0].attributes["rpc.grpc.status_code"] == 0
    assert echo[0].resource.attributes["service.name"] == "probe-svc"

    failed = server_spans(t, probe.method("Fail"))
    assert sorted(s.attributes["rpc.grpc.status_code"] for s in failed) == [3, 13]
    internal = next(s for s in failed if s.attributes["rpc.grpc.status_code"] == 13)
    assert not internal.status.is_ok
    # health checks are not traced (probes would flood the traces) but are measured
    assert not [s for s in t.finished_spans() if "Health" in s.name]

    points = t.metric_points(RPC_DURATION_METRIC)
    counts = {(p.attributes["rpc.method"], p.attributes["rpc.grpc.status_code"]): p.count for p in points}
    assert counts == {("Echo", 0): 2, ("Fail", 3): 1, ("Fail", 13): 1, ("Check", 0): 1}
    assert all(p.attributes["rpc.service"] for p in points)


@pytest.mark.parametrize("read", [1, 3], ids=["mid-stream", "after-last-message"])
def test_cancelled_stream_unwinds_in_its_own_task(arun, probe, memory_telemetry, read, caplog):
    """A client that cancels a yielding stream, mid-way or after its last message but before
    the status (as a client that stops at a finish marker does), through the real server and
    interceptors: the handler unwinds in the RPC's task, nothing is logged at ERROR or reaches
    the loop's error handler, and the RPC still gets its server span and duration point. (The
    unwinding itself, for a stream cancelled while suspended at `yield`, is in test_handlers.)"""
    state = None
    loop_errors: list[dict] = []

    async def main():
        nonlocal state
        state = probe.make_state()
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: loop_errors.append(ctx))
        async with (
            await serve(probe.make_register(state), probe.settings(), telemetry=memory_telemetry) as running,
            grpc.aio.insecure_channel(running.address) as channel,
        ):
            call = channel.unary_stream(probe.method("Ticker"))(str(3 if read == 3 else 1000).encode())
            for _ in range(read):
                await call.read()
            call.cancel()
            await asyncio.wait_for(state.ticker_closed.wait(), 5)
            gc.collect()
            await asyncio.sleep(0.1)  # room for any finaliser task to run and fail

    with caplog.at_level(logging.ERROR):
        arun(main())
    assert state.ticker_closed_in_rpc_task is True
    assert loop_errors == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    (span,) = server_spans(memory_telemetry, probe.method("Ticker"))
    assert span.end_time is not None
    methods = [p.attributes["rpc.method"] for p in memory_telemetry.metric_points(RPC_DURATION_METRIC)]
    assert "Ticker" in methods


def test_client_and_server_spans_share_a_trace(arun, probe, memory_telemetry):
    t = memory_telemetry

    async def main():
        async with (
            await serve(probe.make_register(probe.make_state()), probe.settings(), telemetry=t) as running,
            aio_channel(running.address, running.settings, telemetry=t) as channel,
        ):
            with t.tracer("test").start_as_current_span("request") as root:
                await channel.unary_unary(probe.method("Echo"))(b"hi", timeout=5)
                got = [m async for m in channel.unary_stream(probe.method("Stream"))(b"ok", timeout=5)]
                writer = [
                    m async for m in channel.unary_stream(probe.method("WriterStream"))(b"ok", timeout=5)
                ]
        return root.get_span_context().trace_id, got, writer

    trace_id, got, writer = arun(main())
    assert got == writer == [b"0", b"1", b"2"]
    spans = t.finished_spans()
    for name in ("Echo", "Stream", "WriterStream"):
        (client,) = [s for s in spans if s.kind == SpanKind.CLIENT and s.name == probe.method(name)]
        (server,) = server_spans(t, probe.method(name))
        assert client.context.trace_id == server.context.trace_id == trace_id, name
        assert server.parent.span_id == client.context.span_id, name
        assert server.parent.is_remote


def test_file_exporter_from_several_processes(tmp_path):
    path = tmp_path / "spans" / "all.jsonl"
    child = textwrap.dedent(
        f"""
        from opentelemetry import trace
        from services.runtime.telemetry import current_telemetry, setup_telemetry

        first = setup_telemetry("child-svc", traces_exporter="file:{path}", metrics_exporter="none")
        assert setup_telemetry("other-name", traces_exporter="memory") is first  # idempotent
        assert current_telemetry() is first
        assert trace.get_tracer_provider() is first.tracer_provider  # installed globally
        tracer = trace.get_tracer("child")
        for i in range(50):
            with tracer.start_as_current_span(f"child-{{i}}"):
                pass
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child])
    parent = setup_telemetry("parent-svc", traces_exporter=f"file:{path}", install_global=False)
    tracer = parent.tracer("parent")

    def work(k):
        for i in range(25):
            with tracer.start_as_current_span(f"parent-{k}-{i}", attributes={"note": "x" * 300}):
                pass

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert proc.wait(timeout=30) == 0
    parent.shutdown()

    lines = path.read_text().splitlines()
    spans = [json.loads(line) for line in lines]  # every line is one whole JSON span
    services = [s["resource"]["attributes"]["service.name"] for s in spans]
    assert services.count("child-svc") == 50
    assert services.count("parent-svc") == 50
    assert all(s["context"]["trace_id"].startswith("0x") for s in spans)


def test_exporters_from_standard_env(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "memory")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "memory")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "renamed")
    t = setup_telemetry("draft", install_global=False)
    assert (t.traces_exporters, t.metrics_exporters, t.service_name) == (("memory",), ("memory",), "renamed")
    with t.tracer().start_as_current_span("x"):
        pass
    assert t.finished_spans()[0].resource.attributes["service.name"] == "renamed"
    t.shutdown()

    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    t = setup_telemetry("draft", install_global=False)
    assert (t.traces_exporters, t.metrics_exporters) == ((), ())
    t.shutdown()


def test_default_is_no_exporter(monkeypatch):
    for var in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    t = setup_telemetry("draft", install_global=False)
    assert (t.traces_exporters, t.metrics_exporters) == ((), ())
    t.shutdown()


def test_otlp_and_console_build_without_network(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    t = setup_telemetry(
        "draft", traces_exporter="otlp, console", metrics_exporter="none", install_global=False
    )
    assert t.traces_exporters == ("otlp", "console")
    t.shutdown()  # nothing was recorded, so nothing is sent


@pytest.mark.parametrize(
    ("kwargs", "env", "expect"),
    [
        ({}, {"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER='jaeger': unknown exporter 'jaeger'"),
        ({}, {"OTEL_METRICS_EXPORTER": "file:/tmp/m.jsonl"}, "OTEL_METRICS_EXPORTER"),
        ({"traces_exporter": "file:"}, {}, "file: needs a path"),
    ],
)
def test_bad_exporter_names_the_variable(monkeypatch, kwargs, env, expect):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(TelemetryConfigError, match=expect.replace("(", r"\(")):
        setup_telemetry("draft", install_global=False, **kwargs)


def test_console_spans_are_rate_limited(monkeypatch, caplog):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.runtime.telemetry.exporters import RateLimitedSpanExporter, console_spans_per_second

    now = [100.0]
    inner = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RateLimitedSpanExporter(inner, 3, clock=lambda: now[0])))
    tracer = provider.get_tracer("t")
    for _ in range(10):
        tracer.start_span("burst").end()
    assert len(inner.get_finished_spans()) == 3
    now[0] += 1.5  # the next second: a new allowance, and a word on what was dropped
    with caplog.at_level(logging.WARNING, logger="specmesh.runtime.telemetry"):
        tracer.start_span("later").end()
    assert [s.name for s in inner.get_finished_spans()][-1] == "later"
    assert "dropped 7 spans" in caplog.text

    assert console_spans_per_second() == 20
    monkeypatch.setenv("SPECMESH_CONSOLE_SPANS_PER_SECOND", "lots")
    with pytest.raises(TelemetryConfigError, match="SPECMESH_CONSOLE_SPANS_PER_SECOND"):
        setup_telemetry("draft", "console", install_global=False)
