"""Choose each projection's matmul path per row bucket by timing the candidates on this machine.

Which of F.linear, BLAS's W @ x^T and the oneDNN-packed weight is fastest depends on the CPU
and its BLAS as much as on the shape: a threshold tuned on one machine was 3-4x slower on
another (see kernels.linear). So at engine start every distinct weight shape is timed at each
row bucket's representative row count, on the engine thread with its torch thread count, and
the winner goes into that shape's plan. Every candidate computes the same fp32 product (they
differ only in rounding), so the choice never changes what a model means, only its speed.

Timing is noisy on a shared machine, so the candidates of one bucket run interleaved, the
statistic is the minimum over repetitions, and the default plan's path is kept unless another
is faster by more than MARGIN. Plans are cached in a JSON file next to the model, keyed by CPU
model, torch version, thread count and oneDNN availability; a cache that cannot be read or
written only costs a measurement.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.linear import BUCKET_ROWS, PATHS, Plan, default_plan, linear_path, prepare_packed

log = logging.getLogger(__name__)

CACHE_FILE = ".linear_choice.json"  # next to the weights; hidden, so model manifests leave it out
CACHE_VERSION = 1  # bump when buckets, candidates or the measurement change
MARGIN = 0.10  # another path must beat the default plan's by this fraction to replace it
REPEATS = 5  # timing repetitions per candidate (the minimum is kept)
TARGET_SECONDS = 2e-4  # each repetition runs enough calls to take about this long


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What the measured winners depend on besides the shape."""
    onednn = torch.backends.mkldnn.is_available()
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | onednn {onednn}"


@dataclass
class ShapeChoice:
    plan: Plan
    timings_us: list[dict[str, float]]  # per bucket: candidate -> best microseconds per call


def measure_shape(out_features: int, in_features: int, packed: bool) -> ShapeChoice:
    """Time every candidate path at each bucket's row count for one weight shape."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen)
    packed_w = prepare_packed(w) if packed else None
    candidates = [p for p in PATHS if p != "packed" or packed_w is not None]
    default = default_plan(packed_w is not None)
    plan, timings = [], []
    for bucket, rows in enumerate(BUCKET_ROWS):
        x = torch.randn(rows, in_features, generator=gen)
        for path in candidates:  # warm-up: first-call allocations, oneDNN primitive creation
            linear_path(path, x, w, packed_w)
        t0 = time.perf_counter()
        linear_path(default[bucket], x, w, packed_w)
        calls = max(1, min(200, int(TARGET_SECONDS / max(time.perf_counter() - t0, 1e-7))))
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(REPEATS):
            for path in candidates:  # interleaved, so a burst of load hits every candidate alike
                t0 = time.perf_counter()
                for _ in range(calls):
                    linear_path(path, x, w, packed_w)
                best[path] = min(best[path], (time.perf_counter() - t0) / calls)
        winner = min(best, key=best.get)
        if best[default[bucket]] <= (1 + MARGIN) * best[winner]:
            winner = default[bucket]
        plan.append(winner)
        timings.append({p: round(t * 1e6, 2) for p, t in best.items()})
    return ShapeChoice(tuple(plan), timings)


def shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def choose_plans(
    shapes: list[tuple[int, int]], packed: bool, cache_file: Path | None
) -> tuple[dict[tuple[int, int], ShapeChoice], str]:
    """Plans for weight shapes (out, in), from the cache file where it holds this machine's
    measurement, else measured (and written back). Returns (choices, "cache" | "measured")."""
    key = f"{machine_key()} | packed {packed} | v{CACHE_VERSION}"
    cache = _read(cache_file)
    entry = cache.get(key, {})
    if all(shape_name(s) in entry for s in shapes):
        choices = {
            s: ShapeChoice(tuple(entry[shape_name(s)]["plan"]), entry[shape_name(s)]["timings_us"])
            for s in shapes
        }
        if all(len(c.plan) == len(BUCKET_ROWS) and set(c.plan) <= set(PATHS) for c in choices.values()):
            return choices, "cache"
    choices = {s: measure_shape(*s, packed=packed) for s in shapes}
    entry.update(
        {shape_name(s): {"plan": list(c.plan), "timings_us": c.timings_us} for s, c in choices.items()}
    )
    cache[key] = entry
    _write(cache_file, cache)
    return choices, "measured"


def _read(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError) as e:
        log.warning("ignoring the kernel choice cache %s: %s", path, e)
        return {}


def _write(path: Path | None, data: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # write then rename, so concurrent starts never read half a file
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:
        log.info("kernel choice not cached (%s): %s", path, e)
        tmp.unlink(missing_ok=True)
