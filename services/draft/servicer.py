"""DraftService servicer: per-session draft KV, proposals as token trees. Model info, the engine
thread, sessions, replay and Release come from services.runtime.model_servicer."""

from __future__ import annotations

from services.core.drafting import Drafter, add_prompt_lookup, prompt_lookup_tree
from services.core.engine import Engine
from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.sampling import round_generator
from services.core.sessions import Session
from services.core.strategies import DEFAULT_STRATEGY, Budget, Strategy
from services.draft.convert import (
    RULES,
    budget_from_proto,
    check_served_fields,
    check_tree_room,
    strategy_from_proto,
    tree_to_proto,
)
from services.runtime.model_servicer import ModelServicer
from services.runtime.protocol import sampling_config
from services.runtime.worker import Clock, EngineWorker
from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc

NO_TOKENS = "session has no tokens yet: send the prompt as new_tokens"


class DraftServicer(ModelServicer, draft_pb2_grpc.DraftServiceServicer):
    # ModelInfo.dtype stays unset here, as it always was: with int8 projections the first
    # parameter's dtype does not say what the draft computes in
    reports_dtype = False

    def __init__(
        self,
        engine: Engine,
        *,
        default_strategy: Strategy = DEFAULT_STRATEGY,
        max_sessions: int = 256,
        session_ttl_seconds: float = 600.0,
        license: str = "",
        worker: EngineWorker | None = None,
        batching: bool = True,
    ) -> None:
        super().__init__(
            engine,
            max_sessions=max_sessions,
            session_ttl_seconds=session_ttl_seconds,
            license=license,
            worker=worker,
            batching=batching,
        )
        self.default_strategy = default_strategy
        self.drafter = Drafter(engine)

    def _commit(self, ref: common_pb2.SessionRef, *, model: bool, budget: Budget | None = None) -> Session:
        """Append new tokens to the session's history; their KV is computed lazily (a model-free
        strategy never needs it). Every check that could refuse the call comes first, so a refused
        call neither opens a session nor commits tokens. model: the call runs the draft model (it
        needs at least one token); budget: the tree about to be drafted must fit in the context."""

        def check(length: int) -> None:
            if model and ref.expected_length == length == 0:
                raise FailedPrecondition(NO_TOKENS, "session.new_tokens")
            if budget is not None:
                check_tree_room(length, budget, self.engine.max_context)

        turn = self._open_session(ref, check=check)
        turn.session.commit(turn.new)
        return turn.session

    def _root_logits(self, session: Session):
        pending = session.tokens[session.seq.length :]
        if pending:
            session.last_logits, _ = self.engine.prefill_cached(session.seq, pending)
        if session.last_logits is None:
            raise FailedPrecondition(NO_TOKENS, "session.new_tokens")
        return session.last_logits

    async def Prefill(
        self, request: draft_pb2.DraftPrefillRequest, context
    ) -> draft_pb2.DraftPrefillResponse:
        clock = Clock()
        self._check_model(request.model)

        def run() -> int:
            session = self._commit(request.session, model=True)
            self._root_logits(session)
            return session.length

        length = await self._on_engine(clock, run, key=request.session.session_id)
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
        fingerprint = self._fingerprint(request)

        def run() -> draft_pb2.ProposeResponse:
            replay = self._replayed(request.session.session_id, fingerprint)
            if replay is not None:
                return replay
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
            session.remember(fingerprint, reply)
            return reply

        return self._timed(await self._on_engine(clock, run, key=request.session.session_id), clock)
