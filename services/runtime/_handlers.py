"""Re-wrapping grpc.aio method handlers, shared by the runtime's server interceptors.

grpc.aio accepts two shapes of handler for a streaming response: an async generator
(``yield`` responses) and a coroutine that calls ``await context.write(...)``. A wrapper must
keep the shape of what it wraps, or grpc.aio calls it the wrong way.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc

Behavior = Callable[[Any, Any], Any]
CoroWrapper = Callable[[Behavior], Callable[[Any, Any], Awaitable[Any]]]
GenWrapper = Callable[[Behavior], Callable[[Any, Any], AsyncIterator[Any]]]


def behavior_of(handler: grpc.RpcMethodHandler) -> Behavior:
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream
    if handler.request_streaming:
        return handler.stream_unary
    if handler.response_streaming:
        return handler.unary_stream
    return handler.unary_unary


def yields_responses(handler: grpc.RpcMethodHandler) -> bool:
    """True when the handler streams responses by yielding (not by ``context.write``)."""
    return handler.response_streaming and not inspect.iscoroutinefunction(behavior_of(handler))


def rewrap(
    handler: grpc.RpcMethodHandler,
    coro: CoroWrapper,
    gen: GenWrapper,
    deserializer: Callable[[Any], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behavior is wrapped by `gen` (yielding streams) or `coro` (the
    rest), and whose request deserializer is `deserializer` when one is given."""
    behavior = behavior_of(handler)
    wrapped = gen(behavior) if yields_responses(handler) else coro(behavior)
    if handler.request_streaming and handler.response_streaming:
        factory = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        factory = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        factory = grpc.unary_stream_rpc_method_handler
    else:
        factory = grpc.unary_unary_rpc_method_handler
    return factory(
        wrapped,
        request_deserializer=deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def call_unary(behavior: Behavior, request: Any, context: Any) -> Any:
    result = behavior(request, context)
    if inspect.isawaitable(result):
        result = await result
    return result


async def iterate(behavior: Behavior, request: Any, context: Any) -> AsyncIterator[Any]:
    """The responses of a streaming behavior; closing this closes the behavior's stream too."""
    responses = behavior(request, context)
    if hasattr(responses, "aclose"):
        async with aclosing(responses):
            async for response in responses:
                yield response
    elif hasattr(responses, "__aiter__"):
        async for response in responses:
            yield response
    elif responses is not None:
        for response in responses:
            yield response


def as_writer(behavior: Behavior) -> Callable[[Any, Any], Awaitable[None]]:
    """A yielding stream behavior as a ``context.write`` coroutine that closes the stream itself.

    grpc.aio iterates a yielding handler without closing it: when the client cancels (or
    stops reading after the last message), the generator is closed later, from a garbage
    collection hook in another task. Context-variable tokens set inside it (OpenTelemetry's
    current span) then fail to reset ("created in a different Context"), and a servicer's
    `finally` runs late. Closing it here keeps the whole unwind in the RPC's own task.
    """

    async def writer(request: Any, context: Any) -> None:
        async with aclosing(iterate(behavior, request, context)) as responses:
            async for response in responses:
                await context.write(response)

    return writer


def as_writer_stream(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with its yielding response stream served through as_writer."""
    assert yields_responses(handler)
    return rewrap(handler, coro=lambda behavior: behavior, gen=as_writer)


def split_method(full_method: str | bytes | None) -> tuple[str, str]:
    """``"/pkg.Service/Method"`` -> ``("pkg.Service", "Method")``."""
    if isinstance(full_method, bytes):
        full_method = full_method.decode()
    if not full_method:
        return "", ""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method
