"""TargetService servicer: protobuf -> engine calls -> protobuf. Model info, the engine thread,
sessions, replay and Release come from services.runtime.model_servicer."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator

import torch

from services.core.engine import Engine
from services.core.errors import InvalidArgument, OutOfRange
from services.core.generation import generate, generate_with_kv_budget
from services.core.params import GenerationParams
from services.core.sampling import next_token, round_generator
from services.core.scoring import token_scores
from services.core.sessions import Turn
from services.core.spec import Rule
from services.core.tokenizer import Tokenizer, encode_sources
from services.core.verification import check_draft_tree, verify_round
from services.runtime.model_servicer import ModelServicer
from services.runtime.protocol import (
    FINISH_TO_PROTO,
    generation_params,
    kv_budget,
    prompt_ids,
    sampling_config,
)
from services.runtime.worker import Clock, EngineWorker
from services.target.convert import draft_distributions, verify_params
from specmesh.v1 import common_pb2, target_pb2, target_pb2_grpc

MAX_TOP_LOGPROBS = 20


class TargetServicer(ModelServicer, target_pb2_grpc.TargetServiceServicer):
    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        *,
        max_sessions: int = 256,
        session_ttl_seconds: float = 600.0,
        license: str = "",
        worker: EngineWorker | None = None,
        batching: bool = True,
        max_tree_nodes: int = 256,
        max_new_tokens: int = 4096,
    ) -> None:
        super().__init__(
            engine,
            max_sessions=max_sessions,
            session_ttl_seconds=session_ttl_seconds,
            license=license,
            worker=worker,
            batching=batching,
        )
        self.max_tree_nodes = max_tree_nodes
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        self._tokenizer_reply: target_pb2.GetTokenizerResponse | None = None

    async def GetTokenizer(self, request, context) -> target_pb2.GetTokenizerResponse:
        if self._tokenizer_reply is None:  # built once: a ~2 MB JSON and its digest
            tj, cj, digest = encode_sources(self.tokenizer)
            self._tokenizer_reply = target_pb2.GetTokenizerResponse(
                tokenizer_json=tj, tokenizer_config_json=cj, sha256=digest
            )
        return self._tokenizer_reply

    async def Prefill(self, request: target_pb2.PrefillRequest, context) -> target_pb2.PrefillResponse:
        clock = Clock()
        self._check_model(request.model)

        def run() -> tuple[int, int]:
            turn = self._open_session(request.session)
            cached = self._append(turn)[1] if turn.new else 0
            return turn.session.length, cached

        length, cached = await self._on_engine(clock, run, key=request.session.session_id)
        return target_pb2.PrefillResponse(session_length=length, cached_tokens=cached, timing=clock.timing())

    async def Verify(self, request: target_pb2.VerifyRequest, context) -> target_pb2.VerifyResponse:
        clock = Clock()
        self._check_model(request.model)
        vocab = self.engine.config.vocab_size
        cfg, rule = verify_params(request, vocab)
        tokens, parents = list(request.tree.tokens), list(request.tree.parents)
        lookup = frozenset(request.tree.lookup_nodes)
        fingerprint = self._fingerprint(request)

        def run() -> target_pb2.VerifyResponse:
            # tensor work stays on the engine thread (see services.runtime.worker)
            dists = {} if rule is Rule.GREEDY else draft_distributions(request.tree, vocab)
            check_draft_tree(
                tokens,
                parents,
                dists,
                rule,
                vocab,
                self.max_tree_nodes,
                lookup,
                list(request.tree.draft_logprobs),
            )
            replay = self._replayed(request.session.session_id, fingerprint)
            if replay is not None:
                return replay  # an identical retry: same tokens, nothing re-run
            turn = self._open_session(request.session, len(tokens) + 1, "tree.tokens")
            gen = round_generator(request.random.seed, request.random.counter, domain="verify")
            result = verify_round(
                self.engine, turn.seq, turn.new, tokens, parents, dists, cfg, rule, gen, lookup
            )
            path = result.acceptance.path
            accepted = [tokens[i] for i in path]
            turn.session.commit(turn.new + accepted)
            reply = target_pb2.VerifyResponse(
                accepted_nodes=path,
                accepted_tokens=accepted,
                next_token=result.acceptance.next_token,
                session_length=turn.session.length,
            )
            if request.return_hidden_states:
                h = result.hidden.to(torch.float16).contiguous()
                reply.hidden_states.CopyFrom(
                    common_pb2.Tensor(dtype="float16", shape=list(h.shape), data=h.numpy().tobytes())
                )
            turn.session.remember(fingerprint, reply)
            return reply

        return self._timed(await self._on_engine(clock, run, key=request.session.session_id), clock)

    async def Extend(self, request: target_pb2.ExtendRequest, context) -> target_pb2.ExtendResponse:
        clock = Clock()
        self._check_model(request.model)
        cfg = sampling_config(request.sampling)
        cfg.validate(self.engine.config.vocab_size)
        if not request.session.new_tokens:
            raise InvalidArgument("Extend needs at least one new token", "session.new_tokens")

        def run() -> tuple[int, float, int]:
            turn = self._open_session(request.session)
            logits, _ = self._append(turn)
            token = next_token(logits, cfg, round_generator(request.random.seed, request.random.counter))
            return token, float(logits.float().log_softmax(-1)[token]), turn.session.length

        token, logprob, length = await self._on_engine(clock, run, key=request.session.session_id)
        return target_pb2.ExtendResponse(
            next_token=token, next_logprob=logprob, session_length=length, timing=clock.timing()
        )

    async def Score(self, request: target_pb2.ScoreRequest, context) -> target_pb2.ScoreResponse:
        clock = Clock()
        self._check_model(request.model)
        ids = prompt_ids(request.input, self.tokenizer, "input")
        self.engine.check_tokens(ids, "input.token_ids.ids")
        self.engine.check_room(0, len(ids), "input")
        if len(ids) < 2:
            raise InvalidArgument("needs at least 2 tokens to score (the first has no prediction)", "input")
        start = request.start or 1
        if not 1 <= start < len(ids):
            raise OutOfRange(
                f"must be in [1, {len(ids) - 1}] for {len(ids)} tokens, got {request.start}", "start"
            )
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(
                f"must be in [0, {MAX_TOP_LOGPROBS}], got {request.top_logprobs}", "top_logprobs"
            )

        def run():
            seq = self.engine.new_sequence()
            try:
                logits = self.engine.extend(seq, ids)
            finally:
                seq.release()
            return token_scores(logits[start - 1 : -1], torch.tensor(ids[start:]), request.top_logprobs)

        s = await self._on_engine(clock, run)
        scores = [
            target_pb2.TokenScore(
                token_id=ids[start + i],
                logprob=float(s.logprob[i]),
                rank=int(s.rank[i]),
                entropy=float(s.entropy[i]),
                top_ids=s.top_ids[i].tolist(),
                top_logprobs=s.top_logprobs[i].tolist(),
            )
            for i in range(len(s.logprob))
        ]
        return target_pb2.ScoreResponse(
            token_ids=ids, scores=scores, total_logprob=float(s.logprob.double().sum()), timing=clock.timing()
        )

    async def Generate(
        self, request: target_pb2.GenerateRequest, context
    ) -> AsyncIterator[target_pb2.GenerateResponse]:
        clock = Clock()
        self._check_model(request.model)
        ids = prompt_ids(request.prompt, self.tokenizer)
        self.engine.check_tokens(ids, "prompt.token_ids.ids")
        params = generation_params(request.sampling, seed=random.SystemRandom().randrange(2**63))
        params.validate(
            vocab_size=self.engine.config.vocab_size, prompt_len=len(ids), max_context=self.engine.max_context
        )
        if params.max_new_tokens > self.max_new_tokens:
            raise OutOfRange(
                f"must be at most {self.max_new_tokens} on this server, got {params.max_new_tokens}",
                "sampling.max_new_tokens",
            )
        # this call's engine steps never interleave with each other or another call on the session:
        # the clean-up after a cancelled step must run after that step, not while it waits for its forward
        key = request.session_id or f"generate-{uuid.uuid4().hex}"
        budget = kv_budget(request.kv_budget) if request.HasField("kv_budget") else None
        if budget is not None and request.session_id:
            raise InvalidArgument(
                "a request under a KV budget keeps no session (its compacted KV is its own); "
                "leave session_id empty or drop kv_budget",
                "kv_budget",
            )

        turn: Turn | None = None  # rolled back if the call does not finish
        seq = None  # the pool's sequence; a request under a budget has its own KV
        if budget is not None:
            steps = generate_with_kv_budget(self.engine, self.tokenizer, ids, params, budget)
        elif request.session_id:
            have = self.sessions.length(request.session_id)
            # every check before opening, so a refused call leaves no session behind
            params = _room_checked(params, have + len(ids), self.engine.max_context)
            turn = self.sessions.begin(request.session_id, ids, have + len(ids))
            seq = turn.seq
        else:
            seq = self.engine.new_sequence()
        if seq is not None:
            steps = generate(self.engine, self.tokenizer, seq, ids, params)
        produced: list[int] = []
        finished = False
        try:
            while True:
                step = await self._on_engine(clock, next, steps, None, key=key)
                if step is None:
                    break
                produced += step.token_ids
                if step.finish is None:
                    yield target_pb2.GenerateResponse(token_ids=step.token_ids, text=step.text)
                    continue
                if turn is not None:  # commit the whole exchange, last token's KV included
                    await self._on_engine(clock, self.engine.extend, seq, produced[-1:], key=key)
                    turn.session.commit(ids + produced)
                finished = True
                usage = common_pb2.Usage(
                    prompt_tokens=len(ids), output_tokens=len(produced), seed=params.seed
                )
                yield target_pb2.GenerateResponse(
                    token_ids=step.token_ids,
                    text=step.text,
                    finish_reason=FINISH_TO_PROTO[step.finish.value],
                    usage=usage,
                    timing=clock.timing(),
                )
        finally:
            if turn is None and seq is not None:
                await self._on_engine(clock, seq.release, key=key, bounded=False)
            elif turn is not None and not finished:  # cancelled or failed: as if the call never came
                await self._on_engine(clock, self.sessions.rollback, turn, key=key, bounded=False)


def _room_checked(params: GenerationParams, length: int, max_context: int) -> GenerationParams:
    if length + params.max_new_tokens > max_context:
        raise OutOfRange(
            f"session holds {length} tokens; {params.max_new_tokens} more exceed the context {max_context}",
            "sampling.max_new_tokens",
        )
    return params
