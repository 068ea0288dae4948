"""Draft service process: load a draft model, register the servicer on runtime.serve()."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import grpc

from services.core.drafting import Strategy
from services.core.engine import Engine
from services.core.model_store import resolve_model
from services.draft.servicer import DraftServicer
from services.runtime.server import RunningServer, serve
from services.runtime.settings import ServerSettings
from services.runtime.worker import EngineWorker
from specmesh.v1 import draft_pb2, draft_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name


def load_draft(
    model: str,
    *,
    threads: int | None = None,
    default_strategy: Strategy = Strategy.CHAIN,
    max_sessions: int = 256,
    max_kv_tokens: int = 65536,
    vocab_limit: int | None = None,
    pack_weights: bool = True,
) -> DraftServicer:
    """vocab_limit: restrict the head to the first N ids of the model's draft_vocab.json
    (None = all of them, 0 = the full vocabulary). pack_weights: keep oneDNN-packed weight
    copies so tree levels of 3-16 nodes cost about one node (see services.core.model.linear)."""
    model_dir = resolve_model(model)
    worker = EngineWorker(Path(model_dir).name, threads)  # loads on the thread that will serve
    engine = worker.call(lambda: Engine.from_dir(model_dir, max_kv_tokens=max_kv_tokens))
    vocab = _draft_vocab(Path(model_dir))
    if vocab and vocab_limit != 0:
        worker.call(engine.restrict_vocab, vocab[:vocab_limit] if vocab_limit else vocab)
        log.info("draft head restricted to %d of %d tokens", len(engine.vocab_ids), engine.config.vocab_size)
    if pack_weights and worker.call(engine.pack_weights):
        log.info("packed weight copies: %.0f MiB", engine.packed_bytes / 2**20)
    license = json.loads((Path(model_dir) / "config.json").read_text()).get("specmesh", {}).get("license", "")
    log.info("loaded draft %s (%d parameters) from %s", engine.name, engine.parameter_count(), model_dir)
    return DraftServicer(
        engine, default_strategy=default_strategy, max_sessions=max_sessions, license=license, worker=worker
    )


def registrar(servicer: DraftServicer) -> Callable[[grpc.aio.Server], list[str]]:
    def register(server: grpc.aio.Server) -> list[str]:
        draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    return register


def _draft_vocab(model_dir: Path) -> list[int] | None:
    """Frequency-ordered truncated vocabulary shipped with a trained draft (draft_vocab.json)."""
    path = model_dir / "draft_vocab.json"
    return json.loads(path.read_text())["token_ids"] if path.is_file() else None


async def start_draft(servicer: DraftServicer, settings: ServerSettings) -> RunningServer:
    return await serve(registrar(servicer), settings)
