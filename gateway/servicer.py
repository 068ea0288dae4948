"""Gateway servicer: validate, run the policy loop, stream chunks, report usage and stats."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import trace

from services.core.errors import FailedPrecondition, SpecmeshError, Unavailable
from services.core.tokenizer import Tokenizer, decode_sources
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, target_pb2

from . import metrics as m
from .budget import strategy_name
from .config import GatewayConfig, policy_name
from .policies import PolicyContext, run_policy
from .pool import Replica, UpstreamPool
from .record import RequestRecord, new_session_id
from .requests import Plan, check_resume, plan_warnings, validate
from .session_store import MemoryStore, SessionStore
from .stats import RecentAcceptance

log = logging.getLogger("specmesh.gateway")

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
RELEASE_TIMEOUT_S = 10.0
TOKENIZER_TIMEOUT_S = 30.0
_NEEDS_DRAFT = (
    gateway_pb2.POLICY_DRAFT,
    gateway_pb2.POLICY_SPECULATIVE,
    gateway_pb2.POLICY_R2R,
    gateway_pb2.POLICY_AUTO,
)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """`Gateway` service over a pool of target replicas and (optionally) a pool of draft replicas.

    A bare stub is accepted for either and becomes a one-replica pool without health watching.
    The tokenizer is `tokenizer`, else loaded from `tokenizer_dir`, else fetched from a target
    replica (``TargetService.GetTokenizer``, sha256 checked) on first use, so no model directory
    is needed.
    """

    def __init__(
        self,
        target: UpstreamPool | Any,
        draft: UpstreamPool | Any | None = None,
        *,
        config: GatewayConfig | None = None,
        tokenizer: Tokenizer | None = None,
        tokenizer_dir: str | Path | None = None,
        telemetry=None,
        store: SessionStore | None = None,
    ) -> None:
        self.pools: dict[str, UpstreamPool] = {"target": _as_pool("target", target)}
        if draft is not None:
            self.pools["draft"] = _as_pool("draft", draft)
        self.config = config or GatewayConfig()
        self.store: SessionStore = store if store is not None else MemoryStore()
        self._tokenizer = tokenizer
        self._tokenizer_dir = tokenizer_dir
        self.ins = m.instruments(telemetry)
        self.acceptance = RecentAcceptance()  # policy auto's view of how well the draft does
        self._infos: dict[str, common_pb2.ModelInfo] = {}
        self._load_lock = asyncio.Lock()
        self._releases: set[asyncio.Task] = set()

    @property
    def has_draft(self) -> bool:
        return "draft" in self.pools

    # -- upstream facts, fetched once ---------------------------------------------------------

    async def model_info(self, service: str) -> common_pb2.ModelInfo:
        """The model a role serves (every replica of a pool serves the same one), asked once."""
        info = self._infos.get(service)
        if info is None:
            replica = await self.pools[service].choose()
            info = await replica.stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30)
            self._infos[service] = info
        return info

    async def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            async with self._load_lock:
                if self._tokenizer is None:
                    if self._tokenizer_dir is not None:
                        self._tokenizer = await asyncio.to_thread(Tokenizer.from_dir, self._tokenizer_dir)
                    else:
                        self._tokenizer = await self._fetch_tokenizer()
        return self._tokenizer

    async def _fetch_tokenizer(self) -> Tokenizer:
        """The target's tokenizer and chat template over gRPC (``GetTokenizer``), checked by sha256."""
        try:
            replica = await self.pools["target"].choose()
            reply = await replica.stub.GetTokenizer(
                target_pb2.GetTokenizerRequest(), timeout=TOKENIZER_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            text = f"the gateway cannot fetch the tokenizer from the target ({code.name}: {details})"
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(text, "model") from exc
            raise FailedPrecondition(f"{text}; start the gateway with --tokenizer DIR", "model") from exc
        try:
            return await asyncio.to_thread(
                decode_sources, reply.tokenizer_json, reply.tokenizer_config_json, reply.sha256
            )
        except SpecmeshError as exc:
            raise FailedPrecondition(
                f"the target served an unusable tokenizer ({exc.message}); "
                "start the gateway with --tokenizer DIR",
                "model",
            ) from exc

    # -- sessions ----------------------------------------------------------------------------

    def schedule_release(self, role: str, address: str, session_id: str) -> None:
        """Release a session on one replica in the background (also when the request was cancelled)."""
        replica = self.pools[role].get(address)
        if replica is None:  # the replica left the pool; its sessions went with it
            return
        replica.sessions = max(0, replica.sessions - 1)
        task = asyncio.get_running_loop().create_task(self._release(replica, role, session_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, replica: Replica, role: str, session_id: str) -> None:
        try:
            await replica.stub.Release(
                common_pb2.ReleaseRequest(session_id=session_id), timeout=RELEASE_TIMEOUT_S
            )
        except grpc.RpcError as exc:  # the session expires on its own (or died with its replica)
            log.warning("releasing %s session %s on %s failed: %s", role, session_id, replica.address, exc)

    async def drain(self) -> None:
        """Wait for the background releases still in flight."""
        while self._releases:
            await asyncio.gather(*list(self._releases), return_exceptions=True)

    # -- RPCs ----------------------------------------------------------------------------------

    async def ListModels(self, request, context) -> gateway_pb2.ListModelsResponse:
        # the models a request can name in `model`: the target only (the draft assists it and is
        # not requestable by name; its own GetModelInfo describes it)
        return gateway_pb2.ListModelsResponse(models=[await self.model_info("target")])

    async def GenerateStream(
        self, request: gateway_pb2.GatewayGenerateRequest, context
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        async for chunk in self._generate(request, context):
            yield chunk

    async def Generate(
        self, request: gateway_pb2.GatewayGenerateRequest, context
    ) -> gateway_pb2.GatewayGenerateResponse:
        response = gateway_pb2.GatewayGenerateResponse()
        texts: list[str] = []
        async for chunk in self._generate(request, context):
            response.token_ids.extend(chunk.token_ids)
            texts.append(chunk.text)
            response.warnings.extend(chunk.warnings)
            if chunk.HasField("auto"):
                response.auto.CopyFrom(chunk.auto)
            if chunk.finish_reason:
                response.finish_reason = chunk.finish_reason
                response.usage.CopyFrom(chunk.usage)
                response.spec_stats.CopyFrom(chunk.spec_stats)
                response.session_id = chunk.session_id
        response.text = "".join(texts)
        return response

    # -- one request -------------------------------------------------------------------------------

    async def policy_context(
        self,
        span: trace.Span,
        *,
        timeout: Callable[[], float | None],
        deadline: Callable[[], float | None] = lambda: None,
    ) -> PolicyContext:
        """What a policy loop needs to run one request under `span`."""
        return PolicyContext(
            pools=self.pools,
            tokenizer=await self.tokenizer(),
            config=self.config,
            instruments=self.ins,
            release=self.schedule_release,
            span=span,
            timeout=timeout,
            deadline=deadline,
            acceptance=self.acceptance,
        )

    async def plan(self, request: gateway_pb2.GatewayGenerateRequest) -> tuple[Plan, int]:
        """The validated request and the context length both its models allow."""
        tokenizer = await self.tokenizer()
        target_info = await self.model_info("target")
        policy = request.policy or self.config.default_policy
        draft_info = None
        if policy in _NEEDS_DRAFT and self.has_draft:
            draft_info = await self.model_info("draft")
        # in a thread: tokenizing a long prompt must not stall the event loop (health checks,
        # other streams)
        plan = await asyncio.to_thread(
            validate,
            request,
            tokenizer=tokenizer,
            target_info=target_info,
            draft_info=draft_info,
            config=self.config,
            has_draft=self.has_draft,
        )
        max_context = target_info.max_context
        if draft_info is not None and draft_info.max_context:
            max_context = min(max_context, draft_info.max_context)
        return plan, max_context

    async def _generate(
        self, request: gateway_pb2.GatewayGenerateRequest, context
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        start = time.perf_counter()
        session_id = request.session_id or new_session_id()
        span = self.ins.tracer.start_span(m.REQUEST_SPAN, attributes={m.SESSION_ID: session_id})
        record: RequestRecord | None = None
        first_token_at: float | None = None

        def deadline() -> float | None:
            return context.time_remaining() if context is not None else None

        def timeout() -> float | None:
            remaining = deadline()
            bound = remaining if remaining is not None else self.config.upstream_timeout_s
            attempt = self.config.attempt_timeout_s
            return bound if attempt is None or (bound is not None and bound <= attempt) else attempt

        try:
            with trace.use_span(span, end_on_exit=False):
                ctx = await self.policy_context(span, timeout=timeout, deadline=deadline)
                if request.session_id:
                    record = await self._resumed(request)
                else:
                    plan, max_context = await self.plan(request)
                    record = RequestRecord(session_id=session_id, plan=plan, max_context=max_context)
            span.set_attributes(_request_attributes(record.plan))
            notes = plan_warnings(record.plan)  # told once, on this stream's first chunk

            def first_told(chunk: gateway_pb2.GenerateChunk) -> gateway_pb2.GenerateChunk:
                nonlocal notes
                chunk.warnings.extend(notes)
                notes = []
                return chunk

            if request.session_id:
                span.set_attribute(m.RESUMED, True)
                missed = self._missed(record, request.resume_from)
                if missed is not None:
                    first_token_at = time.perf_counter()
                    yield first_told(missed)
                if record.finish:
                    return
            chunks = run_policy(ctx, record)
            try:
                async for chunk in chunks:
                    if chunk.token_ids and first_token_at is None:
                        first_token_at = time.perf_counter()
                    # saved before it is sent: a stored record covers every token a client has
                    if record.plan.policy != gateway_pb2.POLICY_TARGET or chunk.finish_reason:
                        await self.store.save(record)
                    offset = len(record.tokens) - len(chunk.token_ids)
                    yield first_told(self._labelled(chunk, record, offset=offset))
            finally:
                await chunks.aclose()  # runs the loop's cleanup (session releases) now
        except BaseException as exc:
            if isinstance(exc, GeneratorExit | asyncio.CancelledError):
                span.set_attribute("specmesh.cancelled", True)
            else:
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            self._finish(span, record, start, first_token_at)

    async def _resumed(self, request: gateway_pb2.GatewayGenerateRequest) -> RequestRecord:
        """The stored record of the stream `request` resumes (checked)."""
        record = await self.store.load(request.session_id)
        check_resume(request, len(record.tokens) if record is not None else None)
        assert record is not None
        return record

    def _missed(self, record: RequestRecord, received: int) -> gateway_pb2.GenerateChunk | None:
        """One chunk with the tokens the client missed (and the finish, if the stream had ended)."""
        tokens = record.tokens[received:]
        if not tokens and not record.finish:
            return None
        tokenizer = self._tokenizer
        assert tokenizer is not None  # policy_context() loaded it
        text = tokenizer.decode(record.tokens)[len(tokenizer.decode(record.tokens[:received])) :]
        chunk = gateway_pb2.GenerateChunk(token_ids=tokens, text=text, finish_reason=record.finish)
        return self._labelled(chunk, record, offset=received)

    def _labelled(
        self, chunk: gateway_pb2.GenerateChunk, record: RequestRecord, *, offset: int
    ) -> gateway_pb2.GenerateChunk:
        """`chunk` with its session id and offset, and usage and stats if it is the last one."""
        chunk.session_id = record.session_id
        chunk.offset = offset
        if chunk.finish_reason:
            chunk.usage.CopyFrom(
                common_pb2.Usage(
                    prompt_tokens=len(record.plan.prompt_ids),
                    output_tokens=len(record.tokens),
                    seed=record.plan.seed,
                )
            )
            chunk.spec_stats.CopyFrom(record.stats.to_proto())
        return chunk

    def _finish(
        self, span: trace.Span, record: RequestRecord | None, start: float, first_token_at: float | None
    ) -> None:
        end = time.perf_counter()
        if record is not None:
            plan, stats = record.plan, record.stats
            span.set_attributes(
                {
                    m.USAGE_INPUT_TOKENS: len(plan.prompt_ids),
                    m.USAGE_OUTPUT_TOKENS: len(record.tokens),
                    m.ROUNDS: stats.rounds,
                    m.TAU: stats.tau,
                    m.ACCEPTANCE_RATE: stats.acceptance_rate,
                }
            )
            if record.finish:
                reason = common_pb2.FinishReason.Name(record.finish).removeprefix("FINISH_REASON_").lower()
                span.set_attribute(m.RESPONSE_FINISH_REASONS, [reason])
                if plan.policy == gateway_pb2.POLICY_SPECULATIVE:
                    self.acceptance.add(stats)
            attrs = {
                m.REQUEST_MODEL: plan.model,
                m.OPERATION: plan.operation,
                m.POLICY: policy_name(plan.policy),
            }
            self.ins.request_duration.record(end - start, attrs)
            if first_token_at is not None:
                self.ins.time_to_first_token.record(first_token_at - start, attrs)
                if len(record.tokens) > 1:
                    self.ins.time_per_output_token.record(
                        (end - first_token_at) / (len(record.tokens) - 1), attrs
                    )
        span.end()

    async def close(self) -> None:
        await self.drain()
        for pool in self.pools.values():
            await pool.close()
        await self.store.close()


def _request_attributes(plan: Plan) -> dict:
    attrs = {
        m.OPERATION: plan.operation,
        m.REQUEST_MODEL: plan.model,
        m.REQUEST_MAX_TOKENS: plan.params.max_new_tokens,
        m.REQUEST_TEMPERATURE: plan.params.sampling.temperature,
        m.REQUEST_TOP_P: plan.params.sampling.top_p,
        m.REQUEST_TOP_K: plan.params.sampling.top_k,
        # an OpenTelemetry int is an int64; a client's uint64 seed may not fit
        m.REQUEST_SEED: plan.seed if plan.seed < 1 << 63 else str(plan.seed),
        m.POLICY: policy_name(plan.policy),
    }
    if plan.policy == gateway_pb2.POLICY_SPECULATIVE and plan.budget is not None:
        attrs[m.STRATEGY] = strategy_name(plan.strategy)
        attrs[m.BUDGET_NODES] = plan.budget.max_nodes
        attrs[m.BUDGET_DEPTH] = plan.budget.max_depth
        attrs["specmesh.spec.adaptive"] = plan.adaptive
    return attrs


def _as_pool(role: str, upstream: UpstreamPool | Any) -> UpstreamPool:
    """A pool as is; a bare stub as a one-replica pool (no channel of ours, no health watch)."""
    if isinstance(upstream, UpstreamPool):
        return upstream
    return UpstreamPool(role, [Replica(address=f"{role}-stub", stub=upstream)])
