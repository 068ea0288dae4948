"""ScoringService servicer: protobuf -> scoring features -> protobuf.

Models: the served (target) model scores every method; it is also Binoculars' *performer*. An
optional *observer* sharing its tokenizer (the draft the stack already serves) supplies
Binoculars' cross term. The paper pairs a base observer (Falcon-7b) with its instruct performer
(Falcon-7b-instruct); here the performer is the instruct target, and the observer its distilled
draft, the only other model in the stack with the same tokenizer. ReAGent's replacement model
(whose predictions replace context tokens) is the target itself, not the draft: its fillers are
fluent where the 4-layer draft's are mostly punctuation (README, Scoring and attribution), and
it runs once per request, a small share of ReAGent's forwards. Model info, the engine thread
and the model check come from services.runtime.model_servicer.
"""

from __future__ import annotations

import torch

from services.core.engine import Engine
from services.core.errors import InvalidArgument
from services.core.scoring import detection, membership
from services.core.scoring.attribution import MAX_CONTEXT_TOKENS, Example, attribute, greedy_target
from services.core.scoring.faithfulness import DEFAULT_SAMPLES
from services.core.scoring.features import TokenFeatures
from services.core.scoring.runner import Text, score_texts
from services.core.scoring.uncertainty import summarise
from services.core.tokenizer import Tokenizer
from services.runtime.model_servicer import ModelServicer
from services.runtime.protocol import prompt_ids
from services.runtime.worker import Clock, EngineWorker
from services.scoring import convert
from services.scoring.batcher import Batcher
from services.scoring.detector import Detector
from specmesh.v1 import scoring_pb2, scoring_pb2_grpc

D = scoring_pb2


class ScoringServicer(ModelServicer, scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        *,
        observer: Engine | None = None,
        reference_logfreq: torch.Tensor | None = None,
        detector: Detector | None = None,
        license: str = "",
        worker: EngineWorker | None = None,
        batch_window_s: float = 0.005,
        max_batch_texts: int = 16,
    ) -> None:
        super().__init__(engine, max_sessions=1, license=license, worker=worker)
        if observer is not None and observer.config.vocab_size != engine.config.vocab_size:
            raise ValueError(
                f"observer vocabulary {observer.config.vocab_size} != target {engine.config.vocab_size}"
            )
        self.tokenizer = tokenizer
        self.observer = observer
        self.reference_logfreq = reference_logfreq  # [V] log f for DC-PDD, None = unavailable
        self.detector = detector  # the learned (PAWN) detector, None = unavailable
        self.start_token = convert.start_token_id(tokenizer)
        self.batcher = Batcher(
            self._on_engine,
            lambda texts: score_texts(self.engine, texts, self.start_token, self.observer),
            window_s=batch_window_s,
            max_texts=max_batch_texts,
            max_tokens=max(16384, engine.max_context),
        )

    # --- shared -----------------------------------------------------------------------------

    def _ids(self, prompt, field: str = "input", max_tokens: int | None = None) -> list[int]:
        ids = prompt_ids(prompt, self.tokenizer, field)
        self.engine.check_tokens(ids, f"{field}.token_ids.ids")
        limit = self.engine.max_context if max_tokens is None else max_tokens
        if len(ids) > limit:
            raise InvalidArgument(f"{len(ids)} tokens exceed the limit of {limit}", field)
        return ids

    async def _features(
        self, ids: list[int], clock: Clock, observer: bool = False, hidden: bool = False
    ) -> TokenFeatures:
        return await self.batcher.score(Text(ids, observer=observer, hidden=hidden), clock)

    # --- RPCs -------------------------------------------------------------------------------

    async def Detect(self, request: scoring_pb2.DetectRequest, context) -> scoring_pb2.DetectResponse:
        clock = Clock()
        methods = convert.detect_methods(
            request.methods, self.observer is not None, self.detector is not None
        )
        ids = self._ids(request.input)
        pawn = D.DETECT_METHOD_PAWN in methods
        f = await self._features(ids, clock, observer=D.DETECT_METHOD_BINOCULARS in methods, hidden=pawn)
        mask = torch.ones(1, len(ids), dtype=torch.bool)
        reply = scoring_pb2.DetectResponse(token_ids=ids)
        for m in methods:
            if m == D.DETECT_METHOD_PAWN:
                # on the engine thread: the torch backend must not run torch ops on the event loop
                (logit,) = await self._on_engine(clock, self.detector.logits, [f])
                reply.scores.add(
                    method=m,
                    score=logit,
                    machine_probability=float(torch.sigmoid(torch.tensor(logit))),
                    higher_means_machine=True,
                )  # no per-token values: the score is a gated sum, not a mean of one statistic
                continue
            s = _detect(m, f, mask)
            out = reply.scores.add(
                method=m, score=float(s.value[0]), higher_means_machine=convert.HIGHER_MEANS_MACHINE[m]
            )
            if request.per_token:
                out.per_token.extend(s.per_token[0].tolist())
        reply.timing.CopyFrom(clock.timing())
        return reply

    async def Membership(
        self, request: scoring_pb2.MembershipRequest, context
    ) -> scoring_pb2.MembershipResponse:
        clock = Clock()
        methods = convert.membership_methods(request.methods, self.reference_logfreq is not None)
        k = convert.k_fraction(request.k_fraction)
        ids = self._ids(request.input)
        f = await self._features(ids, clock)
        mask = torch.ones(1, len(ids), dtype=torch.bool)
        lp = f.logprob[None]
        reply = scoring_pb2.MembershipResponse()
        for m in methods:
            if m == D.MEMBERSHIP_METHOD_MIN_K:
                score = membership.min_k(lp, mask, k)
            elif m == D.MEMBERSHIP_METHOD_MIN_K_PLUS_PLUS:
                # mu_t = E_p log p = -entropy_t (see features.logprob_moments)
                z = membership.min_k_plus_plus_values(lp, -f.entropy[None], f.var[None], mask)
                score = membership.min_k(z, mask, k)
            else:
                score, _ = membership.dc_pdd(lp, torch.tensor([ids]), mask, self.reference_logfreq)
            reply.scores.add(method=m, score=float(score[0]))
        reply.timing.CopyFrom(clock.timing())
        return reply

    async def Uncertainty(
        self, request: scoring_pb2.UncertaintyRequest, context
    ) -> scoring_pb2.UncertaintyResponse:
        clock = Clock()
        ids = self._ids(request.input)
        start = convert.uncertainty_start(request.start, len(ids))
        f = await self._features(ids, clock)
        lp, h, kurt = f.logprob[start:], f.entropy[start:], f.kurtosis[start:]
        u = summarise(lp[None], h[None], kurt[None], torch.ones(1, len(lp), dtype=torch.bool))
        return scoring_pb2.UncertaintyResponse(
            token_ids=ids[start:],
            entropy=h.tolist(),
            logprob=lp.tolist(),
            kurtosis=kurt.tolist(),
            mean_entropy=float(u.mean_entropy[0]),
            geometric_mean_prob=float(u.geometric_mean_prob[0]),
            arithmetic_mean_prob=float(u.arithmetic_mean_prob[0]),
            mean_kurtosis=float(u.mean_kurtosis[0]),
            timing=clock.timing(),
        )

    async def Attribute(
        self, request: scoring_pb2.AttributeRequest, context
    ) -> scoring_pb2.AttributeResponse:
        clock = Clock()
        method = convert.attribution_method(request.method)
        cfg = convert.reagent_config(request.replace_ratio_percent)
        n_new = convert.new_tokens(request.max_new_tokens)
        target = convert.target_ids(request.target_text, self.tokenizer)
        m = n_new if target is None else len(target)
        # start + context + all but the last target token go through the model
        ids = self._ids(request.context, "context", min(MAX_CONTEXT_TOKENS, self.engine.max_context - m))

        def run():
            tokens = target or greedy_target(
                self.engine, [self.start_token, *ids], n_new, set(self.tokenizer.eos_token_ids)
            )
            ex = Example(self.start_token, ids, tokens)
            return attribute(self.engine, self.engine, ex, method, request.seed, cfg, DEFAULT_SAMPLES)

        reply = convert.attribute_response(await self._on_engine(clock, run), self.engine.name)
        reply.timing.CopyFrom(clock.timing())
        return reply


def _detect(method: int, f: TokenFeatures, mask: torch.Tensor) -> detection.Score:
    lp = f.logprob[None]
    if method == D.DETECT_METHOD_LOG_LIKELIHOOD:
        return detection.log_likelihood(lp, mask)
    if method == D.DETECT_METHOD_LOG_RANK:
        return detection.log_rank(f.rank[None], mask)
    if method == D.DETECT_METHOD_ENTROPY:
        return detection.mean_entropy(f.entropy[None], mask)
    if method == D.DETECT_METHOD_BINOCULARS:
        return detection.binoculars(lp, f.cross_entropy[None], mask)
    # Fast-DetectGPT with the target as both sampling and scoring model (the paper's white-box
    # setting): the moments are the target's own, mean = -entropy
    return detection.fast_detectgpt(lp, -f.entropy[None], f.var[None], mask)
