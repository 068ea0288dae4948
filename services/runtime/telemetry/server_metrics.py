"""The ``rpc.server.duration`` histogram, recorded by a server interceptor."""

from __future__ import annotations

import time
from contextlib import aclosing

import grpc.aio
from opentelemetry import metrics

from .._handlers import call_unary, iterate, rewrap, split_method
from .status import status_code


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Records ``rpc.server.duration`` (ms, histogram) per RPC.

    Attributes: ``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``
    (int). Put it outside the exception interceptor so it sees the mapped status.
    """

    def __init__(self, histogram: metrics.Histogram) -> None:
        self._histogram = histogram

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)
        histogram = self._histogram

        def record(start: float, context, exc: BaseException | None) -> None:
            code = status_code(context, exc)
            histogram.record(
                (time.perf_counter() - start) * 1000.0,
                {
                    "rpc.system": "grpc",
                    "rpc.service": service,
                    "rpc.method": method,
                    "rpc.grpc.status_code": code.value[0],
                },
            )

        def coro(behavior):
            async def wrapper(request, context):
                start = time.perf_counter()
                try:
                    result = await call_unary(behavior, request, context)
                except BaseException as exc:
                    record(start, context, exc)
                    raise
                record(start, context, None)
                return result

            return wrapper

        def gen(behavior):
            async def wrapper(request, context):
                start = time.perf_counter()
                try:
                    async with aclosing(iterate(behavior, request, context)) as responses:
                        async for response in responses:
                            yield response
                except BaseException as exc:
                    record(start, context, exc)
                    raise
                record(start, context, None)

            return wrapper

        return rewrap(handler, coro, gen)
