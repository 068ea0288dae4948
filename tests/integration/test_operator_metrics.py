"""Operator metrics from a real `specmesh serve target` process (a tiny imported model),
scraped over HTTP from its Prometheus endpoint (--metrics-port) while it holds a session."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request

import grpc

from specmesh.v1 import common_pb2, target_pb2, target_pb2_grpc

METRICS = [
    "specmesh_sessions_open",
    "specmesh_kv_blocks_used",
    "specmesh_kv_blocks_cached",
    "specmesh_kv_blocks_capacity",
    "specmesh_kv_blocks_resident",
    "specmesh_engine_queue_depth",
    "specmesh_engine_queue_wait_seconds_count",
    "rpc_server_duration_milliseconds_count",
]


def _wait_for(process: subprocess.Popen, pattern: str, lines: list[str], timeout: float = 60) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(lines)}")


def _value(text: str, name: str) -> float:
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
    assert found, f"{name} not scraped:\n{text}"
    return found[0]


def test_metrics_endpoint_of_a_running_target(tiny_gguf, tmp_path) -> None:
    from services.core import model_import as mi

    model = mi.import_gguf(tiny_gguf().path, "tiny", root=tmp_path, progress=False, license="apache-2.0")
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}
    args = ["serve", "target", "--model", str(model), "--port", "0", "--metrics-port", "0", "--threads", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "specmesh.cli.main", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        url = _wait_for(process, r"Prometheus metrics on (http://\S+)", lines).group(1)
        address = _wait_for(process, r"serving tiny on (\S+)", lines).group(1)
        with grpc.insecure_channel(address) as channel:
            stub = target_pb2_grpc.TargetServiceStub(channel)
            ref = common_pb2.SessionRef(session_id="ops", new_tokens=list(range(3, 40)), expected_length=37)
            stub.Prefill(target_pb2.PrefillRequest(session=ref))
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode()
        for name in METRICS:
            _value(text, name)
        assert _value(text, "specmesh_sessions_open") == 1
        assert _value(text, "specmesh_kv_blocks_used") >= 37 // 16  # the session's full blocks at least
        assert _value(text, "specmesh_kv_blocks_resident") >= _value(text, "specmesh_kv_blocks_used")
        assert _value(text, "specmesh_engine_queue_wait_seconds_count") >= 1
        assert 'specmesh_model="tiny"' in text and 'specmesh_service="target"' in text
    finally:
        process.terminate()
        process.wait(timeout=30)
