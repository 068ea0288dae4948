"""Start-up of a model service: load an engine on the thread that will serve it.

Not exported by `services.runtime` (which the gateway imports without torch): model services
import it directly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kernels.linear_choice import CACHE_FILE
from services.core.model_store import resolve_model
from services.runtime.settings import EngineSettings
from services.runtime.worker import EngineWorker

if TYPE_CHECKING:
    from services.core.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class LoadedEngine:
    engine: Engine
    worker: EngineWorker  # the engine thread: all later torch work of the service goes here
    model_dir: Path
    license: str  # from config.json's specmesh block, "" when absent


# oneDNN keeps a primitive, with its scratch memory, for every (weight, row count) it has run, up
# to 1,024 by default; merged forwards and prefills bring ever new row counts, so a busy service's
# resident memory crept with them. 16 measured 150 MB less after warm-up and less growth (+2.5%
# against +3.9% over 40 mixed batches in-process; +12.7% against +19% through `bench load`) at
# unchanged tokens/s on the 2-core Xeon. oneDNN reads the variable when it first builds a
# primitive, so setting it here, before the engine's first forward, is early enough; a value in
# the environment wins.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = "16"


def load_engine(
    model: str,
    *,
    threads: int | None,
    max_kv_tokens: int,
    pack_weights: bool,
    prepare: Callable[[Engine], None] | None = None,
    weights: str = "fp32",
    limits: EngineSettings | None = None,
) -> LoadedEngine:
    """Resolve `model`, load it on a new engine thread (see services.runtime.worker), run
    `prepare` there (a draft restricts its head), then keep oneDNN-packed weight copies when
    `pack_weights` (see services.core.model.linear). weights: `fp32`, or `q4_1` for the
    model's published 4-bit groups (services.core.quant). `limits`: the engine thread's
    batching window, batch size and queue bound (defaults: EngineSettings())."""
    from services.core.engine import Engine  # lazy: torch

    os.environ.setdefault(ONEDNN_CACHE_ENV, ONEDNN_CACHE_CAPACITY)
    model_dir = Path(resolve_model(model))
    limits = limits or EngineSettings()
    worker = EngineWorker(
        model_dir.name,
        threads,
        window_s=limits.batch_window_ms / 1000,
        max_batch=limits.max_batch,
        max_queue=limits.max_queue,
    )
    engine = worker.call(
        lambda: Engine.from_dir(
            model_dir, max_kv_tokens=max_kv_tokens, prefix_cache_tokens=limits.prefix_cache_tokens
        )
    )
    if prepare is not None:
        worker.call(prepare, engine)
    if weights == "q4_1":
        if not worker.call(engine.use_q4_weights, model_dir):
            raise RuntimeError("--weights q4_1 needs torch's CPU int4 kernel, which this torch build lacks")
        log.info("serving the published 4-bit weights (Q4_1 groups, bf16 activations)")
    elif weights != "fp32":
        raise ValueError(f"unknown weights {weights!r}: expected fp32 or q4_1")
    if pack_weights and worker.call(engine.pack_weights):
        log.info("packed weight copies: %.0f MiB", engine.packed_bytes / 2**20)
    choice = worker.call(engine.choose_linear_paths, model_dir / CACHE_FILE)
    if choice.get("plans"):
        log.info(
            "matmul paths per row bucket %s (%s on %s): %s",
            choice["bucket_rows"],
            choice["source"],
            choice["machine"],
            "; ".join(f"{shape} {'/'.join(plan)}" for shape, plan in choice["plans"].items()),
        )
    config = json.loads((model_dir / "config.json").read_text())
    license = (config.get("specmesh") or {}).get("license", "")
    log.info("loaded %s (%d parameters) from %s", engine.name, engine.parameter_count(), model_dir)
    return LoadedEngine(engine, worker, model_dir, license)


def engine_limits(limits: EngineSettings | None, max_sessions: int | None) -> EngineSettings:
    """`limits` (default EngineSettings()) with max_sessions overridden when given."""
    limits = limits or EngineSettings()
    return limits if max_sessions is None else limits.replace(max_sessions=max_sessions)
