"""Draft service process: load a draft model, register the servicer on runtime.serve()."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import grpc

from services.core.engine import Engine
from services.core.model_store import load_draft_vocab, resolve_model
from services.core.strategies import DEFAULT_STRATEGY, Strategy
from services.draft.router import Router, default_router_dir, load_router
from services.draft.servicer import DraftServicer
from services.runtime.loading import engine_limits, load_engine
from services.runtime.server import RunningServer, serve
from services.runtime.settings import EngineSettings, ServerSettings
from specmesh.v1 import draft_pb2, draft_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name


def load_draft(
    model: str,
    *,
    threads: int | None = None,
    default_strategy: Strategy = DEFAULT_STRATEGY,
    max_sessions: int | None = None,
    max_kv_tokens: int = 65536,
    vocab_limit: int | None = None,
    pack_weights: bool = True,
    int8: bool = True,
    limits: EngineSettings | None = None,
    router: str | Path | None = "auto",
) -> DraftServicer:
    """vocab_limit: restrict the head to the first N ids of the model's draft_vocab.json
    (None = all of them, 0 = the full vocabulary). int8: compute the projections with int8
    weights (services.core.model.int8_weight; lossless all the same, ~1.6x faster per draft
    token on CPU). pack_weights: keep oneDNN-packed copies of the fp32 weights int8 does not
    serve, so tree levels of 3-16 nodes cost about one node (see services.core.model.linear).
    router: policy r2r's token router: "auto" = the draft directory's own (router/) when it has
    one, a directory = that one (it must load), None = none (routed proposals are refused). A
    router that does not match the draft fails here, at start-up, never at request time."""
    model_dir = resolve_model(model)
    vocab = load_draft_vocab(model_dir, size=vocab_limit)

    def prepare(engine: Engine) -> None:
        if vocab and vocab_limit != 0:
            engine.restrict_vocab(vocab)
            log.info("draft head restricted to %d of %d tokens", len(vocab), engine.config.vocab_size)
        if int8:
            if engine.quantize_int8():
                log.info("int8 projection weights: %.0f MiB", engine.int8_bytes / 2**20)
            else:
                log.warning("int8 kernels (fbgemm) unavailable here: the draft computes in fp32")

    limits = engine_limits(limits, max_sessions)
    loaded = load_engine(
        model,
        threads=threads,
        max_kv_tokens=max_kv_tokens,
        pack_weights=pack_weights,
        prepare=prepare,
        limits=limits,
    )
    return DraftServicer(
        loaded.engine,
        default_strategy=default_strategy,
        max_sessions=limits.max_sessions,
        session_ttl_seconds=limits.session_ttl_seconds,
        license=loaded.license,
        worker=loaded.worker,
        batching=limits.batching,
        router=_router(router, loaded.engine, model_dir),
    )


def _router(choice: str | Path | None, engine: Engine, draft_dir: Path) -> Router | None:
    if choice is None:
        return None
    if choice == "auto":
        choice = default_router_dir(draft_dir)
        if not choice.exists():
            log.info("no router in %s: policy r2r is unavailable (see `specmesh train router`)", choice)
            return None
    return load_router(Path(choice), engine, draft_dir)  # logs which router, backend and threshold


def registrar(servicer: DraftServicer) -> Callable[[grpc.aio.Server], list[str]]:
    def register(server: grpc.aio.Server) -> list[str]:
        draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    return register


async def start_draft(servicer: DraftServicer, settings: ServerSettings) -> RunningServer:
    return await serve(registrar(servicer), settings)
