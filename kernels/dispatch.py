"""Which implementation a kernel dispatcher runs: Triton or the pure-torch reference.

`SPECMESH_KERNELS` chooses:
- `auto` (default): Triton where it can run compiled (a CUDA tensor and an importable
  `triton`), the reference everywhere else, so the CPU path and CI never need a GPU;
- `reference`: always the reference (to rule the kernels out when chasing a difference);
- `triton`: always Triton, also for CPU tensors, which only works under the Triton interpreter
  (`TRITON_INTERPRET=1`); the tests use it to run the kernels through the engine on CPU.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

MODES = ("auto", "reference", "triton")


def kernel_mode() -> str:
    mode = os.environ.get("SPECMESH_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"SPECMESH_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


@cache
def triton_available() -> bool:
    """`triton` imports (it is a dependency on Linux x86_64 only)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(device: torch.device) -> bool:
    """Run the Triton kernel for tensors on `device`?"""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("SPECMESH_KERNELS=triton but the `triton` package is not installed")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"SPECMESH_KERNELS=triton with {device.type} tensors needs the Triton interpreter "
                "(TRITON_INTERPRET=1); on a GPU use auto"
            )
        return True
    return device.type == "cuda" and triton_available()
