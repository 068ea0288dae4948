"""Target service process: load a model, register the servicer on runtime.serve()."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import grpc

from services.core.engine import Engine
from services.core.model_store import resolve_model
from services.core.tokenizer import Tokenizer
from services.runtime.server import RunningServer, serve
from services.runtime.settings import ServerSettings
from services.runtime.worker import EngineWorker
from services.target.servicer import TargetServicer
from specmesh.v1 import target_pb2, target_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name


def load_target(
    model: str,
    *,
    threads: int | None = None,
    max_sessions: int = 256,
    max_kv_tokens: int = 65536,
    pack_weights: bool = True,
) -> TargetServicer:
    """pack_weights: keep oneDNN-packed weight copies so verifying 3-16 tokens costs about one
    decode step (CPU fp32; see services.core.model.linear)."""
    model_dir = resolve_model(model)
    worker = EngineWorker(Path(model_dir).name, threads)  # loads on the thread that will serve
    engine = worker.call(lambda: Engine.from_dir(model_dir, max_kv_tokens=max_kv_tokens))
    if pack_weights and worker.call(engine.pack_weights):
        log.info("packed weight copies: %.0f MiB", engine.packed_bytes / 2**20)
    license = json.loads((Path(model_dir) / "config.json").read_text()).get("specmesh", {}).get("license", "")
    log.info("loaded %s (%d parameters) from %s", engine.name, engine.parameter_count(), model_dir)
    return TargetServicer(
        engine, Tokenizer.from_dir(model_dir), max_sessions=max_sessions, license=license, worker=worker
    )


def registrar(servicer: TargetServicer) -> Callable[[grpc.aio.Server], list[str]]:
    def register(server: grpc.aio.Server) -> list[str]:
        target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    return register


async def start_target(servicer: TargetServicer, settings: ServerSettings) -> RunningServer:
    return await serve(registrar(servicer), settings)
