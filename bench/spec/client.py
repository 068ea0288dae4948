"""The gateway client: one blocking Generate call per request, timed on this side of the wire."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from bench.spec.runs import Record, RunConfig


class StackClient:
    """Blocking Gateway.Generate calls, timed on this side of the wire."""

    def __init__(self, address: str, timeout: float) -> None:
        import grpc

        from specmesh.v1 import gateway_pb2_grpc

        self.address = address
        self.timeout = timeout
        self.channel = grpc.insecure_channel(address)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def list_models(self) -> list[dict[str, Any]]:
        from specmesh.v1 import gateway_pb2

        response = self.stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=60)
        return [
            {"name": m.name, "digest": m.digest, "parameters": m.parameters, "max_context": m.max_context}
            for m in response.models
        ]

    def request(
        self,
        run: RunConfig,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        ignore_eos: bool,
    ) -> Any:
        from gateway.budget import strategy_value
        from gateway.config import policy_value
        from specmesh.v1 import common_pb2, gateway_pb2

        sampling = common_pb2.SamplingParams(
            temperature=temperature,
            top_k=0,
            top_p=0.0,
            seed=seed,
            max_new_tokens=max_new_tokens,
            ignore_eos=ignore_eos,
        )
        spec = None
        if run.speculative:
            assert run.strategy is not None
            spec = gateway_pb2.SpecOptions(
                strategy=strategy_value(run.strategy),
                adaptive=run.adaptive,
                budget=common_pb2.TreeBudget(lookup_tokens=run.lookup_tokens),
            )
        return gateway_pb2.GatewayGenerateRequest(
            prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(prompt_ids))),
            sampling=sampling,
            policy=policy_value(run.policy),
            spec=spec,
        )

    def generate(self, request: Any, record: Record) -> Record:
        import grpc

        from specmesh.v1 import common_pb2

        try:
            t0 = time.perf_counter()
            response = self.stub.Generate(request, timeout=self.timeout)
            record.wall_s = time.perf_counter() - t0
        except grpc.RpcError as exc:
            record.error = f"{exc.code().name}: {exc.details()}"
            return record
        s = response.spec_stats
        record.tokens = list(response.token_ids)
        record.rounds, record.drafted, record.accepted = s.rounds, s.drafted_tokens, s.accepted_tokens
        record.cached_prompt_tokens = response.usage.cached_prompt_tokens
        record.finish_reason = (
            common_pb2.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()
        )
        return record
