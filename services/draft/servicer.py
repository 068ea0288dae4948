"""DraftService servicer: per-session draft KV, proposals as token trees."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

from services.core.drafting import Drafter, add_prompt_lookup, prompt_lookup_tree
from services.core.engine import Engine
from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.sampling import round_generator
from services.core.sessions import Session, SessionStore
from services.core.strategies import DEFAULT_STRATEGY, Budget, Strategy
from services.draft.convert import (
    RULES,
    budget_from_proto,
    check_served_fields,
    check_tree_room,
    strategy_from_proto,
    tree_to_proto,
)
from services.runtime.protocol import sampling_config
from services.runtime.worker import Clock, EngineWorker
from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc

T = TypeVar("T")
NO_TOKENS = "session has no tokens yet: send the prompt as new_tokens"


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(
        self,
        engine: Engine,
        *,
        default_strategy: Strategy = DEFAULT_STRATEGY,
        max_sessions: int = 256,
        session_ttl_seconds: float = 600.0,
        license: str = "",
        worker: EngineWorker | None = None,
    ) -> None:
        self.engine = engine
        self.default_strategy = default_strategy
        self.license = license
        self.drafter = Drafter(engine)
        self.sessions = SessionStore(
            engine.new_sequence, max_sessions=max_sessions, ttl_seconds=session_ttl_seconds
        )
        # the thread the engine was loaded on, when the loader made one (see services.runtime.worker)
        self._worker = worker or EngineWorker(engine.name)

    async def _on_engine(self, clock: Clock, fn: Callable[..., T], *args) -> T:
        return await self._worker.run(clock, fn, *args)

    def _check_model(self, name: str) -> None:
        if name and name != self.engine.name:
            raise InvalidArgument(f"unknown model {name!r}; this server serves {self.engine.name!r}", "model")

    def _commit(self, ref: common_pb2.SessionRef, *, model: bool, budget: Budget | None = None) -> Session:
        """Append new tokens to the session's history; their KV is computed lazily (a model-free
        strategy never needs it). Every check that could refuse the call comes first, so a refused
        call neither opens a session nor commits tokens. model: the call runs the draft model (it
        needs at least one token); budget: the tree about to be drafted must fit in the context."""
        new = list(ref.new_tokens)
        self.engine.check_tokens(new, "session.new_tokens")
        existing = self.sessions.get(ref.session_id)
        have = existing.length if existing else 0
        self.engine.check_room(have, len(new), "session.new_tokens")
        if model and ref.expected_length == have + len(new) == 0:
            raise FailedPrecondition(NO_TOKENS, "session.new_tokens")
        if budget is not None:
            check_tree_room(have + len(new), budget, self.engine.max_context)
        session = self.sessions.open(ref.session_id, new, ref.expected_length)
        session.tokens += new
        return session

    def _root_logits(self, session: Session):
        pending = session.tokens[session.seq.length :]
        if pending:
            session.last_logits = self.engine.prefill(session.seq, pending)
        if session.last_logits is None:
            raise FailedPrecondition(NO_TOKENS, "session.new_tokens")
        return session.last_logits

    async def GetModelInfo(self, request, context) -> common_pb2.ModelInfo:
        cfg = self.engine.config
        return common_pb2.ModelInfo(
            name=self.engine.name,
            family="llama",
            vocab_size=cfg.vocab_size,
            max_context=self.engine.max_context,
            digest=self.engine.digest,
            parameters=self.engine.parameter_count(),
            license=self.license,
        )

    async def Prefill(
        self, request: draft_pb2.DraftPrefillRequest, context
    ) -> draft_pb2.DraftPrefillResponse:
        clock = Clock()
        self._check_model(request.model)

        def run() -> int:
            session = self._commit(request.session, model=True)
            self._root_logits(session)
            return session.length

        length = await self._on_engine(clock, run)
        return draft_pb2.DraftPrefillResponse(session_length=length, timing=clock.timing())

    async def Propose(self, request: draft_pb2.ProposeRequest, context) -> draft_pb2.ProposeResponse:
        clock = Clock()
        self._check_model(request.model)
        strategy = strategy_from_proto(request.strategy, self.default_strategy)
        budget = budget_from_proto(request.budget, strategy)
        sampling = sampling_config(request.sampling)
        sampling.validate(self.engine.config.vocab_size)
        check_served_fields(request)
        columns = (
            len(self.engine.vocab_ids) if self.engine.vocab_ids is not None else self.engine.config.vocab_size
        )
        if not 0 <= request.vocab_limit <= columns:
            raise InvalidArgument(
                f"must be in [0, {columns}] (the draft's vocabulary; 0 = all), got {request.vocab_limit}",
                "vocab_limit",
            )
        fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).digest()

        def run() -> draft_pb2.ProposeResponse:
            existing = self.sessions.get(request.session.session_id)
            if existing and existing.last_reply and existing.last_reply[0] == fingerprint:
                return existing.last_reply[1]
            model = strategy is not Strategy.PROMPT_LOOKUP
            session = self._commit(request.session, model=model, budget=budget)
            if strategy is Strategy.PROMPT_LOOKUP:
                tree = prompt_lookup_tree(session.tokens, budget, sampling)
            else:
                gen = round_generator(request.random.seed, request.random.counter, domain="draft")
                tree = self.drafter.propose(
                    session.seq, self._root_logits(session), strategy, budget, sampling, gen
                )
                if budget.lookup_tokens:
                    add_prompt_lookup(tree, session.tokens, budget.lookup_tokens)
            reply = draft_pb2.ProposeResponse(
                tree=tree_to_proto(tree), session_length=session.length, rule=RULES[tree.rule]
            )
            session.last_reply = (fingerprint, reply)
            return reply

        reply = await self._on_engine(clock, run)
        out = draft_pb2.ProposeResponse()
        out.CopyFrom(reply)
        out.timing.CopyFrom(clock.timing())
        return out

    async def Release(self, request: common_pb2.ReleaseRequest, context) -> common_pb2.ReleaseResponse:
        if not request.session_id:
            raise InvalidArgument("session_id is empty", "session_id")
        released = await self._on_engine(Clock(), self.sessions.release, request.session_id)
        return common_pb2.ReleaseResponse(released=released)

    def close(self) -> None:
        self._worker.close()
