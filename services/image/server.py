"""Image service process: load the AR target, its draft and the VQ tokenizer on one engine
thread, register the servicer on runtime.serve()."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import grpc

from services.image.servicer import ImageServicer
from services.image.store import load_image_models
from services.runtime.server import RunningServer, serve
from services.runtime.settings import ServerSettings
from services.runtime.worker import EngineWorker
from specmesh.v1 import image_pb2, image_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = image_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name


def load_image(
    model_dir: str | Path | None = None, *, threads: int | None = None, max_kv_tokens: int = 65536
) -> ImageServicer:
    from services.core.engine import Engine  # lazy: torch

    worker = EngineWorker("image", threads)
    models = worker.call(load_image_models, model_dir)

    def engines() -> tuple[Engine, Engine]:
        return (
            Engine.from_dir(models.target_dir, name=models.dir.name, max_kv_tokens=max_kv_tokens),
            Engine.from_dir(models.draft_dir, name=f"{models.dir.name}-draft", max_kv_tokens=max_kv_tokens),
        )

    target, draft = worker.call(engines)
    servicer = worker.call(lambda: ImageServicer(target, draft, models, worker=worker, license="Apache-2.0"))
    log.info(
        "image models loaded from %s (%d + %d parameters)",
        models.dir,
        target.parameter_count(),
        draft.parameter_count(),
    )
    return servicer


def registrar(servicer: ImageServicer) -> Callable[[grpc.aio.Server], list[str]]:
    def register(server: grpc.aio.Server) -> list[str]:
        image_pb2_grpc.add_ImageServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    return register


async def start_image(servicer: ImageServicer, settings: ServerSettings) -> RunningServer:
    return await serve(registrar(servicer), settings)
