"""Target service process: load a model, register the servicer on runtime.serve()."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from services.core.tokenizer import Tokenizer
from services.runtime.loading import engine_limits, load_engine
from services.runtime.server import RunningServer, serve
from services.runtime.settings import EngineSettings, ServerSettings
from services.target.servicer import TargetServicer
from specmesh.v1 import target_pb2, target_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name


def load_target(
    model: str,
    *,
    threads: int | None = None,
    max_sessions: int | None = None,
    max_kv_tokens: int = 65536,
    pack_weights: bool = True,
    weights: str = "fp32",
    limits: EngineSettings | None = None,
) -> TargetServicer:
    """pack_weights: keep oneDNN-packed weight copies so verifying 3-16 tokens costs about one
    decode step (CPU fp32; see services.core.model.linear). weights: fp32 or q4_1."""
    limits = engine_limits(limits, max_sessions)
    loaded = load_engine(
        model,
        threads=threads,
        max_kv_tokens=max_kv_tokens,
        pack_weights=pack_weights,
        weights=weights,
        limits=limits,
    )
    return TargetServicer(
        loaded.engine,
        Tokenizer.from_dir(loaded.model_dir),
        max_sessions=limits.max_sessions,
        session_ttl_seconds=limits.session_ttl_seconds,
        license=loaded.license,
        worker=loaded.worker,
        batching=limits.batching,
        max_tree_nodes=limits.max_tree_nodes,
        max_new_tokens=limits.max_new_tokens,
    )


def registrar(servicer: TargetServicer) -> Callable[[grpc.aio.Server], list[str]]:
    def register(server: grpc.aio.Server) -> list[str]:
        target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    return register


async def start_target(servicer: TargetServicer, settings: ServerSettings) -> RunningServer:
    return await serve(registrar(servicer), settings)
