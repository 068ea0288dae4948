"""DraftService servicer: per-session draft KV, proposals as token trees. Model info, the engine
thread, sessions, replay and Release come from services.runtime.model_servicer."""

from __future__ import annotations

from dataclasses import replace

import torch

from services.core.drafting import Drafter, add_prompt_lookup, multinomial_draw, prompt_lookup_tree
from services.core.engine import Engine
from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.routed_drafting import TokenRouter, draft_routed_chain, reconcile
from services.core.sampling import round_generator
from services.core.sessions import Session
from services.core.spec import Rule
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
        router: TokenRouter | None = None,
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
        self.router = router  # policy r2r's token router (None: routed proposals are refused)

    def features(self) -> list[str]:
        return ["route"] if self.router is not None else []

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

    def _root(self, session: Session) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [C], hidden [H]) after the session's last committed token, computing only
        what the KV does not hold yet. KV a routed chain wrote ahead of the history stays where
        the history confirms it and is cut where it does not."""
        seq = session.seq
        held = reconcile(seq, session.tokens)
        if held == session.length and session.logits_at != held:
            if held == 0:
                raise FailedPrecondition(NO_TOKENS, "session.new_tokens")
            seq.truncate(held - 1)  # the KV is there but not the logits after it: redo the last token
        pending = session.tokens[seq.length :]
        if pending:
            cached = self.engine.adopt_cached(seq, pending)
            logits, hidden = self.engine.forward([seq], [pending[cached:]], last_only=True)
            session.last_logits, session.last_hidden = logits[0][-1], hidden[0][-1]
            session.logits_at = seq.length
        return session.last_logits, session.last_hidden

    async def Prefill(
        self, request: draft_pb2.DraftPrefillRequest, context
    ) -> draft_pb2.DraftPrefillResponse:
        clock = Clock()
        self._check_model(request.model)

        def run() -> int:
            session = self._commit(request.session, model=True)
            self._root(session)
            return session.length

        length = await self._on_engine(clock, run, key=request.session.session_id)
        return draft_pb2.DraftPrefillResponse(session_length=length, timing=clock.timing())

    async def Propose(self, request: draft_pb2.ProposeRequest, context) -> draft_pb2.ProposeResponse:
        clock = Clock()
        self._check_model(request.model)
        strategy = strategy_from_proto(request.strategy, self.default_strategy)
        budget = budget_from_proto(request.budget, strategy)
        if request.route and not request.budget.HasField("lookup_tokens"):
            budget = replace(budget, lookup_tokens=0)  # a routed chain merges no lookup path
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
        threshold = self._route_threshold(request, strategy, budget)
        fingerprint = self._fingerprint(request)

        def run() -> draft_pb2.ProposeResponse:
            replay = self._replayed(request.session.session_id, fingerprint)
            if replay is not None:
                return replay
            model = strategy is not Strategy.PROMPT_LOOKUP
            session = self._commit(request.session, model=model, budget=budget)
            gen = round_generator(request.random.seed, request.random.counter, domain="draft")
            if request.route:
                return self._routed(session, budget, sampling, gen, threshold, request.vocab_limit)
            if strategy is Strategy.PROMPT_LOOKUP:
                tree = prompt_lookup_tree(session.tokens, budget, sampling)
            else:
                logits, _ = self._root(session)
                tree = self.drafter.propose(session.seq, logits, strategy, budget, sampling, gen)
                if budget.lookup_tokens:
                    add_prompt_lookup(tree, session.tokens, budget.lookup_tokens)
            reply = draft_pb2.ProposeResponse(
                tree=tree_to_proto(tree), session_length=session.length, rule=RULES[tree.rule]
            )
            session.remember(fingerprint, reply)
            return reply

        return self._timed(await self._on_engine(clock, run, key=request.session.session_id), clock)

    def _route_threshold(
        self, request: draft_pb2.ProposeRequest, strategy: Strategy, budget: Budget
    ) -> float:
        """The threshold a routed request cuts its chain at, after refusing what a routed
        request cannot ask for (0.0 for requests that do not route)."""
        if not request.route:
            if request.HasField("route_threshold"):
                raise InvalidArgument(
                    "is for routed proposals; set route=true or leave it unset", "route_threshold"
                )
            return 0.0
        if self.router is None:
            raise FailedPrecondition(
                "this draft service has no router loaded: start it with --router DIR "
                "(train one with `specmesh train router`)",
                "route",
            )
        if strategy is not Strategy.CHAIN or budget.lookup_tokens:
            raise InvalidArgument(
                f"a routed proposal is a CHAIN without lookup tokens, got {strategy.wire} with "
                f"{budget.lookup_tokens} lookup tokens",
                "strategy",
            )
        if not request.HasField("route_threshold"):
            return self.router.threshold
        threshold = request.route_threshold
        if not 0.0 <= threshold <= 1.0:  # NaN fails too
            raise InvalidArgument(f"must be in [0, 1], got {threshold}", "route_threshold")
        return threshold

    def _routed(self, session: Session, budget: Budget, sampling, gen, threshold: float, vocab_limit: int):
        """A routed chain (R2R): drafted into the session's KV, cut at the first routed token."""
        assert self.router is not None
        chain, (logits, hidden) = draft_routed_chain(
            self.engine,
            session.seq,
            self._root(session),
            budget.max_nodes,
            sampling,
            multinomial_draw(gen),
            self.router.divergence,
            threshold,
            vocab_limit,
        )
        session.last_logits, session.last_hidden, session.logits_at = logits, hidden, session.seq.length
        tree = common_pb2.TokenTree(
            tokens=chain.tokens, parents=list(range(-1, len(chain.tokens) - 1)), draft_logprobs=chain.logprobs
        )
        return draft_pb2.ProposeResponse(
            tree=tree,
            session_length=session.length,
            divergence=chain.divergence,
            route_threshold=threshold,
            rule=RULES[Rule.GREEDY if sampling.greedy else Rule.CHAIN],
        )
