"""Foreseeable mistakes reach the user as one line and exit code 2, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

GATEWAY = ["serve", "gateway", "--target", "127.0.0.1:1"]


@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _run(args: list[str], **env: str) -> tuple[int, str]:
    """`specmesh ARGS` in a fresh process (telemetry is set up once per process)."""
    done = subprocess.run(
        [sys.executable, "-m", "specmesh.cli.main", *args],
        env={**os.environ, "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    err = done.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return done.returncode, err


def test_taken_port(taken_port) -> None:
    code, err = _run([*GATEWAY, "--port", str(taken_port)])
    assert code == 2 and "Address already in use" in err


def test_bad_telemetry_setting() -> None:
    code, err = _run([*GATEWAY, "--port", "0"], OTEL_TRACES_EXPORTER="bogus")
    assert code == 2 and "OTEL_TRACES_EXPORTER='bogus'" in err


def test_unreadable_certificate(tmp_path) -> None:
    missing = str(tmp_path / "missing.pem")
    code, err = _run([*GATEWAY, "--port", "0", "--tls-cert-file", missing, "--tls-key-file", missing])
    assert code == 2 and "tls_cert_file: cannot read" in err


def test_taken_metrics_port(taken_port) -> None:
    code, err = _run([*GATEWAY, "--port", "0", "--metrics-port", str(taken_port)])
    assert code == 2 and f"metrics_port: cannot serve Prometheus metrics on 127.0.0.1:{taken_port}" in err
