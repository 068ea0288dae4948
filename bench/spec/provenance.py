"""Where and from what a run was measured: machine (CPU model included), threads, load, commit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from bench.decode import machine_info
from bench.spec.config import SpecBenchConfig

REPO = Path(__file__).resolve().parents[2]  # the checkout the stack is started from


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_info(repo: Path = REPO) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def machine(
    cfg: SpecBenchConfig, omp_in_process: bool | None, loadavg_start: list[float] | None, git_start: dict
) -> dict[str, Any]:
    """The `machine` section; the stack's thread settings are None when --gateway ran elsewhere."""
    local = cfg.gateway is None
    threads = {
        "omp_wait_policy": cfg.omp_wait_policy,
        "omp_wait_policy_in_process": omp_in_process,
        "target_threads": cfg.target_threads if local else None,
        "draft_threads": cfg.draft_threads if local else None,
        "draft_int8": cfg.draft_int8 if local else None,
        "target_weights": cfg.target_weights if local else None,
        "omp_spincount": cfg.omp_spincount if local else None,
        "hf_threads": cfg.hf_threads if cfg.hf else None,
        "bench_process_torch_threads": torch_threads(),
    }
    return machine_info(threads["bench_process_torch_threads"] or 0) | {
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg(),
        "threads": threads,
        **git_start,
    }
