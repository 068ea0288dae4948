"""The observability wiring: services -> OTel collector -> Jaeger, in compose and the chart's file.

Three links, each checked against the thing on the other side rather than a written-down copy:
1. what the services export: with the compose environment of the observability profile
   (OTEL_TRACES_EXPORTER=otlp), the real telemetry setup sends spans over OTLP/gRPC to
   OTEL_EXPORTER_OTLP_ENDPOINT; a stand-in OTLP/gRPC receiver gets them here;
2. that endpoint is the collector's compose service, on the port of its otlp grpc receiver, and
   the collector reads the chart's otel-collector.yaml (one file for both);
3. the collector's traces pipeline exports over OTLP to the Jaeger service, on a port Jaeger
   serves OTLP on.
"""

from __future__ import annotations

import re
import threading
from concurrent import futures
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from deploy_tools import CHART, container_ports, env_of, load_compose, read_env_file
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services.runtime.telemetry import setup_telemetry

COLLECTOR_FILE = CHART / "otel-collector.yaml"


@pytest.fixture(scope="module")
def observed() -> dict:
    """The compose file as `OTEL_TRACES_EXPORTER=otlp docker compose --profile observability up` sees it."""
    return load_compose({**read_env_file(), "OTEL_TRACES_EXPORTER": "otlp"})


@pytest.fixture(scope="module")
def collector_config() -> dict:
    return yaml.safe_load(COLLECTOR_FILE.read_text())


def _expand(value: str, env: dict[str, str]) -> str:
    """The collector's ${env:NAME} substitution."""

    def sub(m: re.Match) -> str:
        assert m.group(1) in env, f"the collector needs {m.group(1)} in its environment"
        return env[m.group(1)]

    return re.sub(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}", sub, value)


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.got = threading.Event()

    def Export(self, request, context):  # noqa: N802
        self.requests.append(request)
        self.got.set()
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.mark.parametrize("name", ["target", "draft", "gateway"])
def test_services_export_otlp_grpc_where_compose_points(observed, monkeypatch, name) -> None:
    env = env_of(observed["services"][name])
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc") == "grpc"
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"

    receiver = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for key, value in env.items():
            if key.startswith("OTEL_"):
                monkeypatch.setenv(key, value)
        # the same scheme (http: plaintext) and protocol, our loopback in place of the collector
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"{endpoint.scheme}://127.0.0.1:{port}")
        telemetry = setup_telemetry(f"specmesh-{name}", install_global=False, metrics_exporter="none")
        with telemetry.tracer().start_as_current_span("deploy-check"):
            pass
        telemetry.force_flush()
        assert receiver.got.wait(10), "no span reached the OTLP/gRPC receiver"
        telemetry.shutdown()
    finally:
        server.stop(0)
    (resource,) = {
        a.value.string_value
        for r in receiver.requests
        for rs in r.resource_spans
        for a in rs.resource.attributes
        if a.key == "service.name"
    }
    assert resource == f"specmesh-{name}"


def test_the_endpoint_is_the_collectors_otlp_grpc_receiver(observed, collector_config) -> None:
    services = observed["services"]
    hosts = {
        urlsplit(env_of(services[n])["OTEL_EXPORTER_OTLP_ENDPOINT"]).netloc
        for n in services
        if "OTEL_EXPORTER_OTLP_ENDPOINT" in env_of(services[n])
    }
    assert len(hosts) == 1, f"every service should export to the same collector: {hosts}"
    host, port = hosts.pop().rsplit(":", 1)
    collector = services[host]
    assert collector.get("profiles") == ["observability"]
    receiver = collector_config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert receiver.rsplit(":", 1) == ["0.0.0.0", port]
    assert int(port) in container_ports(collector)
    assert "otlp" in collector_config["service"]["pipelines"]["traces"]["receivers"]
    # compose mounts the chart's file where the collector reads its configuration
    (config_flag,) = [a for a in collector["command"] if a.startswith("--config=")]
    assert f"./charts/specmesh/otel-collector.yaml:{config_flag.split('=', 1)[1]}:ro" in collector["volumes"]


def test_the_collector_exports_traces_to_jaeger(observed, collector_config) -> None:
    services = observed["services"]
    (collector_name,) = [n for n, s in services.items() if "otel-collector.yaml" in str(s.get("volumes"))]
    collector_env = env_of(services[collector_name])
    pipeline = collector_config["service"]["pipelines"]["traces"]
    assert set(pipeline["processors"]) <= set(collector_config["processors"])
    (exporter_name,) = pipeline["exporters"]
    assert exporter_name.split("/")[0] == "otlp", "Jaeger is reached over OTLP/gRPC"
    exporter = collector_config["exporters"][exporter_name]
    host, port = _expand(exporter["endpoint"], collector_env).rsplit(":", 1)
    jaeger = services[host]
    assert jaeger["image"].startswith("jaegertracing/") and jaeger.get("profiles") == ["observability"]
    assert int(port) == 4317 and int(port) in container_ports(jaeger)  # Jaeger's OTLP/gRPC port
    assert env_of(jaeger).get("COLLECTOR_OTLP_ENABLED") == "true"
    assert exporter["tls"]["insecure"] is True  # Jaeger's OTLP port inside the stack is plaintext
    assert "16686" in str(jaeger["ports"])  # the UI
    assert services[collector_name]["depends_on"][host]["condition"] == "service_started"


def test_without_the_profile_nothing_is_exported(compose) -> None:
    """The default stack (no profile, .env as shipped) sends no spans anywhere."""
    for name in ("target", "draft", "gateway"):
        assert env_of(compose["services"][name])["OTEL_TRACES_EXPORTER"] == "none"
