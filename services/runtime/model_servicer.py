"""The base every model servicer shares: model info, the model-id check, the engine thread,
session open/commit, idempotent replay and Release.

A service's servicer subclasses :class:`ModelServicer` (with its generated ``*Servicer``
class) and only converts protobuf to domain calls and back, as TGI's ``server.py`` does.
Session state itself (commit, rollback, the replay cache) lives in ``services.core.sessions``.

Not imported by ``services.runtime`` itself: the gateway imports that package and never
loads an engine.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message

from services.core.errors import InvalidArgument
from services.core.sessions import SessionStore, Turn, fingerprint
from services.runtime.telemetry.operator_metrics import ModelMetrics
from services.runtime.worker import Clock, EngineWorker
from specmesh.v1 import common_pb2

if TYPE_CHECKING:
    from services.core.engine import Engine

T = TypeVar("T")
M = TypeVar("M", bound=Message)


class ModelServicer:
    """One engine, its thread and its sessions behind a gRPC service.

    All model work runs on one engine thread (:class:`EngineWorker`), so the event loop
    (health checks, other RPCs) stays responsive and the KV cache needs no locks.
    """

    family = "llama"
    # ModelInfo.dtype is the dtype of the first parameter; a servicer whose engine computes in
    # another precision than its weights say (the int8 draft) leaves it unset.
    reports_dtype = True

    def __init__(
        self,
        engine: Engine,
        *,
        max_sessions: int = 256,
        session_ttl_seconds: float = 600.0,
        license: str = "",
        worker: EngineWorker | None = None,
        batching: bool = True,
    ) -> None:
        """batching: merge concurrent calls' forwards (services.runtime.batching); outputs are
        the same either way, up to floating-point rounding of the larger matmuls."""
        self.engine = engine
        self.license = license
        self.sessions = SessionStore(
            engine.new_sequence, max_sessions=max_sessions, ttl_seconds=session_ttl_seconds
        )
        # the thread the engine was loaded on, when the loader made one (see services.runtime.worker)
        self._worker = worker or EngineWorker(engine.name)
        self.engine_calls = 0  # waiting for or running on the engine thread (a gauge reads it)
        self._sweeper: asyncio.Task | None = None  # expires idle sessions (see _sweep_idle)
        self.metrics = ModelMetrics(self)
        if batching:
            self._worker.attach(engine)
            self._worker.batcher.on_batch = self.metrics.batched

    # --- the engine thread ------------------------------------------------------------------

    async def _on_engine(
        self, clock: Clock, fn: Callable[..., T], *args, key: str | None = None, bounded: bool = True
    ) -> T:
        """fn(*args) on the engine thread; calls with the same key (session id) never interleave;
        bounded=False for clean-up, which the queue limit must never refuse."""
        self._start_sweeper()
        queued = clock.queue_ns
        self.engine_calls += 1
        try:
            return await self._worker.run(clock, fn, *args, key=key or None, bounded=bounded)
        finally:
            self.engine_calls -= 1
            if clock.queue_ns != queued:  # the call reached the engine thread
                self.metrics.waited((clock.queue_ns - queued) / 1e9)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._worker.close()

    # --- idle sessions ------------------------------------------------------------------------

    def _start_sweeper(self) -> None:
        """Start the idle-session sweep on the running loop, once per loop: from the first call
        on, so a server that then gets no traffic still frees the KV of sessions left open."""
        loop = asyncio.get_running_loop()
        if self._sweeper is None or self._sweeper.done() or self._sweeper.get_loop() is not loop:
            interval = max(0.01, min(self.sessions.ttl_seconds / 4, 30.0))
            self._sweeper = loop.create_task(_sweep_idle(weakref.ref(self), interval))

    # --- model info and the model-id check ---------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name and name != self.engine.name:
            raise InvalidArgument(f"unknown model {name!r}; this server serves {self.engine.name!r}", "model")

    def _model_info(self) -> common_pb2.ModelInfo:
        engine = self.engine
        info = common_pb2.ModelInfo(
            name=engine.name,
            family=self.family,
            vocab_size=engine.config.vocab_size,
            max_context=engine.max_context,
            digest=engine.digest,
            parameters=engine.parameter_count(),
            license=self.license,
        )
        if self.reports_dtype:
            info.dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
        info.features.extend(self.features())
        return info

    def features(self) -> list[str]:
        """ModelInfo.features: what this service offers beyond its RPCs' basics."""
        return []

    async def GetModelInfo(self, request, context) -> common_pb2.ModelInfo:
        return self._model_info()

    # --- sessions -----------------------------------------------------------------------------

    def _open_session(
        self,
        ref: common_pb2.SessionRef,
        then: int = 0,
        then_field: str = "",
        check: Callable[[int], None] | None = None,
    ) -> Turn:
        """Find or create the session after every check that could refuse the call, so a refused
        call never leaves a new session behind. `then`: positions the call needs after the new
        tokens (a tree and its bonus position), checked against the context as `then_field`;
        `check`: the service's own checks, given the session's length with the new tokens."""
        new = list(ref.new_tokens)
        self.engine.check_tokens(new, "session.new_tokens")
        have = self.sessions.length(ref.session_id)
        self.engine.check_room(have, len(new), "session.new_tokens")
        if then:
            self.engine.check_room(have + len(new), then, then_field)
        if check is not None:
            check(have + len(new))
        return self.sessions.begin(ref.session_id, new, ref.expected_length)

    def _append(self, turn: Turn) -> tuple[Any, int]:
        """Forward the turn's new tokens and commit them. Returns the next-token logits [V] and
        how many of the tokens reused cached KV blocks (a prefix another session computed)."""
        logits, cached = self.engine.prefill_cached(turn.seq, turn.new)
        turn.session.commit(turn.new)
        return logits, cached

    async def Release(self, request: common_pb2.ReleaseRequest, context) -> common_pb2.ReleaseResponse:
        if not request.session_id:
            raise InvalidArgument("session_id is empty", "session_id")
        released = await self._on_engine(
            Clock(), self.sessions.release, request.session_id, key=request.session_id, bounded=False
        )
        return common_pb2.ReleaseResponse(released=released)

    # --- idempotent replay --------------------------------------------------------------------

    @staticmethod
    def _fingerprint(request: Message) -> bytes:
        return fingerprint(request.SerializeToString(deterministic=True))

    def _replayed(self, session_id: str, request_fingerprint: bytes) -> Any | None:
        """The reply to an identical retry of the session's last state-changing call, else None."""
        return self.sessions.replay(session_id, request_fingerprint)

    @staticmethod
    def _timed(reply: M, clock: Clock) -> M:
        """A copy of a (possibly remembered) reply carrying this call's timing."""
        out = type(reply)()
        out.CopyFrom(reply)
        out.timing.CopyFrom(clock.timing())
        return out


async def _sweep_idle(servicer_ref: weakref.ref[ModelServicer], interval_s: float) -> None:
    """Every interval_s, expire the sessions idle past their TTL (on the engine thread, which
    owns the KV). Holds the servicer weakly between sweeps, so a dropped one is collected and
    the sweep ends; a session expires at most interval_s (a quarter of the TTL) late."""
    while True:
        await asyncio.sleep(interval_s)
        servicer = servicer_ref()
        if servicer is None:
            return
        await servicer._on_engine(Clock(), servicer.sessions.expire_idle, bounded=False)
        del servicer
