"""Scoring service process: load the target (performer) and an optional observer on one engine
thread, register the servicer on runtime.serve()."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import grpc

from services.core.errors import FailedPrecondition
from services.core.model_store import resolve_model
from services.core.scoring.reference import load_counts, log_frequencies, vocab_digest
from services.core.tokenizer import Tokenizer
from services.runtime.loading import load_engine
from services.runtime.server import RunningServer, serve
from services.runtime.settings import ServerSettings
from services.scoring.detector import Detector, default_detector_dir, load_detector
from services.scoring.reference_corpus import DATA_DIR
from services.scoring.servicer import ScoringServicer
from specmesh.v1 import scoring_pb2, scoring_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name


def find_reference(tokenizer: Tokenizer, path: str | Path | None = None):
    """log f [V] for DC-PDD: from `path`, else the shipped table made with this tokenizer's
    vocabulary (services/scoring/data), else None (DC-PDD unavailable)."""
    digest = vocab_digest(tokenizer)
    candidates = [Path(path)] if path else sorted(DATA_DIR.glob("*.token_counts.npy"))
    for p in candidates:
        counts, meta = load_counts(p)
        if meta.get("tokenizer_vocab_sha256") == digest and len(counts) == tokenizer.vocab_size:
            log.info("DC-PDD reference: %s (%d tokens)", p, counts.sum())
            return log_frequencies(counts)
        if path:
            raise ValueError(f"{p} was not counted with this model's tokenizer")
    log.warning("no DC-PDD reference table for this tokenizer: DC_PDD is unavailable")
    return None


def load_scoring(
    model: str,
    *,
    observer: str | None = None,
    reference: str | None = None,
    threads: int | None = None,
    max_kv_tokens: int = 65536,
    pack_weights: bool = True,
    detector: str | Path | bool | None = None,
) -> ScoringServicer:
    """detector: the learned detector's directory; None = `<model dir>/detector/` when there is
    one (a missing or mismatched default only logs: PAWN is then unavailable); False = none."""
    from services.core.engine import Engine  # lazy: torch

    loaded = load_engine(model, threads=threads, max_kv_tokens=max_kv_tokens, pack_weights=pack_weights)
    tokenizer = Tokenizer.from_dir(loaded.model_dir)
    observer_engine = None
    if observer:
        obs_dir = Path(resolve_model(observer))
        if vocab_digest(Tokenizer.from_dir(obs_dir)) != vocab_digest(tokenizer):
            raise ValueError(f"observer {obs_dir.name} does not share the target's tokenizer")
        # the same engine thread as the target (see services.runtime.worker)
        observer_engine = loaded.worker.call(lambda: Engine.from_dir(obs_dir, max_kv_tokens=max_kv_tokens))
        if pack_weights:
            loaded.worker.call(observer_engine.pack_weights)
        log.info("observer %s loaded from %s", observer_engine.name, obs_dir)
    return ScoringServicer(
        loaded.engine,
        tokenizer,
        observer=observer_engine,
        reference_logfreq=find_reference(tokenizer, reference),
        detector=_detector(detector, loaded.engine, Path(loaded.model_dir)),
        license=loaded.license,
        worker=loaded.worker,
    )


def _detector(choice: str | Path | bool | None, engine, model_dir: Path) -> Detector | None:
    if choice is False:
        return None
    if choice is None:
        default = default_detector_dir(model_dir)
        if not default.is_dir():
            log.info("no learned detector in %s: PAWN is unavailable (`specmesh train detector`)", default)
            return None
        try:
            return load_detector(default, engine, model_dir)
        except FailedPrecondition as exc:
            log.warning("learned detector not loaded, PAWN is unavailable: %s", exc.message)
            return None
    return load_detector(Path(choice), engine, model_dir)  # asked for by name: refuse loudly


def registrar(servicer: ScoringServicer) -> Callable[[grpc.aio.Server], list[str]]:
    def register(server: grpc.aio.Server) -> list[str]:
        scoring_pb2_grpc.add_ScoringServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    return register


async def start_scoring(servicer: ScoringServicer, settings: ServerSettings) -> RunningServer:
    return await serve(registrar(servicer), settings)
