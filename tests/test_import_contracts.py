"""Import direction (DESIGN.md §1): the import-linter contracts in pyproject.toml hold.

The contracts see every import statement, also those inside functions, and a forbidden import
is forbidden through any chain of imports, so "the gateway never imports torch" fails as soon as
one module the gateway reaches imports torch anywhere. A second test runs the same contracts over
a synthetic tree that breaks each one, so a contract that can no longer fail is noticed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("importlinter", reason="import-linter is in the `test` extra")

# The contracts the layout rules need; the test fails if one is dropped from pyproject.toml.
EXPECTED = {
    "services.core imports nothing above it (and no gRPC)",
    "services never import each other or the gateway",
    "services.scoring imports only services.core and services.runtime of ours (and the stubs)",
    "services.runtime imports no service, the gateway, the CLI or the benchmarks",
    "the gateway (and its CLI entry) never imports torch or a service",
    "the benchmarks and the stack supervisor never import the CLI",
    "only the CLI imports a service (the benchmarks, kernels and the stack supervisor do not)",
}


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        "from importlinter.cli import lint_imports\n"
        "sys.exit(lint_imports(no_cache=True, no_logo=True))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(cwd), "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_contracts_are_configured() -> None:
    names = {c["name"] for c in _config()["contracts"]}
    assert names >= EXPECTED, f"missing contracts: {sorted(EXPECTED - names)}"


def test_import_contracts_hold() -> None:
    result = _lint(ROOT)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    for name in EXPECTED:
        assert f"{name} KEPT" in report, report


# One violation per contract, each a chain of two imports (indirect) where that is possible.
_BAD_TREE = {
    "services/__init__.py": "",
    "services/core/__init__.py": "",
    "services/core/engine.py": "def f():\n    from services.core import helper  # noqa\n",
    "services/core/helper.py": "import gateway.server\n",
    "services/core/tok.py": "def load():\n    import torch  # inside a function: still an import\n",
    "services/runtime/__init__.py": "",
    "services/runtime/server.py": "import services.target.servicer\n",
    "services/target/__init__.py": "",
    "services/target/servicer.py": "import services.draft.servicer\n",
    "services/draft/__init__.py": "",
    "services/draft/servicer.py": "",
    "services/scoring/__init__.py": "",
    "services/scoring/servicer.py": "import specmesh.stack\n",
    "services/image/__init__.py": "",
    "services/image/servicer.py": "",
    "gateway/__init__.py": "",
    "gateway/server.py": "import services.core.tok\n",
    "specmesh/__init__.py": "",
    "specmesh/stack.py": "import specmesh.cli.up\n",
    "specmesh/cli/__init__.py": "",
    "specmesh/cli/up.py": "",
    "specmesh/cli/serve_gateway.py": "import gateway.server\n",
    "bench/__init__.py": "",
    "bench/spec.py": "from specmesh.cli import up\n",
    "kernels/__init__.py": "",
    "kernels/matmul.py": "def pick():\n    from services.draft import servicer  # noqa\n",
}


def test_contracts_catch_violations(tmp_path: Path) -> None:
    for rel, text in _BAD_TREE.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    contracts = _config()
    lines = ["[tool.importlinter]"]
    lines.append(f"root_packages = {contracts['root_packages']!r}")
    lines.append(f"include_external_packages = {str(contracts['include_external_packages']).lower()}")
    for c in contracts["contracts"]:
        lines.append("\n[[tool.importlinter.contracts]]")
        lines += [f"{k} = {v!r}" for k, v in c.items()]
    (tmp_path / "pyproject.toml").write_text("\n".join(lines).replace("'", '"') + "\n")
    result = _lint(tmp_path)
    report = result.stdout + result.stderr
    assert result.returncode == 1, report
    for name in EXPECTED:
        assert f"{name} BROKEN" in report, report
    assert "services.core.tok -> torch" in report, report  # found through a function-level import
