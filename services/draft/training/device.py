"""Where a run computes and in which precision: the device, the labelling dtype, autocast."""

from __future__ import annotations

import contextlib
import time
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


def _probe(x: torch.Tensor, w: torch.Tensor, rounds: int = 30) -> None:
    """Small ops in a row, like a decoder's: a [64, 576] x [576, 1536] product, an activation
    and a residual add per round (about 1 ms a round on one core)."""
    for _ in range(rounds):
        x = x + torch.nn.functional.silu(x @ w)[:, : x.shape[1]]


def choose_threads() -> int:
    """Set torch's intra-op threads to whichever of (its default, 1) runs a short probe faster
    here, and return it. On a 2-core machine where another process keeps one core busy, every
    parallel op waits for a time slice of the second thread: a 64-token SmolLM2 forward measured
    5.9 s with 2 threads against 0.12 s with 1 there, while a batched rollout runs 1.5x faster
    with 2 on an idle machine (2-core Xeon). Costs tens of ms idle, about a second contended."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 576, generator=g), torch.randn(576, 1536, generator=g) / 24
    timings = {}
    for n in dict.fromkeys((torch.get_num_threads(), 1)):
        torch.set_num_threads(n)
        _probe(x, w, rounds=2)  # warm-up: first-call allocations
        t = time.perf_counter()
        _probe(x, w)
        timings[n] = time.perf_counter() - t
    chosen = min(timings, key=timings.__getitem__)
    torch.set_num_threads(chosen)
    return chosen
