"""The Prometheus scrape endpoint (services/runtime/telemetry/prometheus.py): requests by status
from a real server, scraped over HTTP; a taken port is one clear error; the metrics_port
setting."""

from __future__ import annotations

import socket
import urllib.request

import grpc
import pytest

from services.runtime.server import serve
from services.runtime.settings import ServerSettings, SettingsError
from services.runtime.telemetry import TelemetryConfigError, setup_telemetry


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.status == 200
        return reply.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample of `name` whose labels include `labels`."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(value)
    return None


def test_requests_by_status_are_scraped_over_http(arun, probe) -> None:
    telemetry = setup_telemetry("prom-test", "none", "none", install_global=False, metrics_port=0)
    try:
        assert telemetry.prometheus is not None and telemetry.prometheus.port > 0

        async def main():
            async with (
                await serve(
                    probe.make_register(probe.make_state()), probe.settings(), telemetry=telemetry
                ) as running,
                grpc.aio.insecure_channel(running.address) as channel,
            ):
                for _ in range(3):
                    await channel.unary_unary(probe.method("Echo"))(b"hi", timeout=5)
                with pytest.raises(grpc.aio.AioRpcError):
                    await channel.unary_unary(probe.method("Fail"))(b"invalid", timeout=5)

        arun(main())
        text = scrape(telemetry.prometheus.url)
        count = "rpc_server_duration_milliseconds_count"
        assert sample(text, count, rpc_method="Echo", rpc_grpc_status_code="0") == 3
        assert sample(text, count, rpc_method="Fail", rpc_grpc_status_code="3") == 1
        assert 'service_name="prom-test"' in text  # target_info carries the resource
    finally:
        telemetry.shutdown()


def test_taken_port_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            TelemetryConfigError, match=f"metrics_port: cannot serve Prometheus metrics on 127.0.0.1:{port}"
        ):
            setup_telemetry("prom-test", "none", "none", install_global=False, metrics_port=port)


def test_metrics_port_setting(monkeypatch) -> None:
    assert ServerSettings().metrics_port is None
    monkeypatch.setenv("SPECMESH_METRICS_PORT", "9464")
    assert ServerSettings.from_env().metrics_port == 9464
    monkeypatch.setenv("SPECMESH_METRICS_PORT", "off")
    assert ServerSettings.from_env().metrics_port is None
    for bad in (dict(metrics_port=70000), dict(metrics_port=5000, port=5000)):
        with pytest.raises(SettingsError, match="metrics_port"):
            ServerSettings(**bad)
