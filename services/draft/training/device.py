"""Where a run computes and in which precision: the device, the labelling dtype, autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from services.core.errors import InvalidArgument

from .tmodel import TrainLlama


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda requested but no CUDA device is available", field="device")
    return torch.device(name)


def label_dtype(dev: torch.device) -> torch.dtype:
    """bf16 where the hardware has it natively (CUDA, AVX512-BF16 CPUs), else fp32."""
    if dev.type == "cuda":
        return torch.bfloat16
    bf16_ok = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if bf16_ok else torch.float32


def autocast(dev: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of bf16-autocast contexts where bf16 is native, of null contexts elsewhere."""
    if dev.type == "cuda" or label_dtype(dev) == torch.bfloat16:
        return lambda: torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def cast_copy(model: TrainLlama, dtype: torch.dtype) -> TrainLlama:
    """A frozen copy of `model` in `dtype` on the same device (the fast labelling teacher)."""
    m = TrainLlama(model.config)
    m.load_state_dict(model.state_dict())
    return m.to(next(model.parameters()).device, dtype).eval().requires_grad_(False)
