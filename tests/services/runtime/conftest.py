"""Shared pieces for the runtime tests: a raw-bytes test service served by the real runtime.

pytest runs in importlib mode, so tests reach these helpers through the `probe` fixture
rather than by importing this module.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from services.core.errors import InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from services.runtime.settings import ServerSettings
from services.runtime.telemetry import setup_telemetry

SERVICE = "specmesh.test.Probe"


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def make_state() -> SimpleNamespace:
    """Per-test state shared with the handlers; create it inside the running loop."""
    return SimpleNamespace(
        slow_started=asyncio.Event(),
        slow_finished=0,
        release=asyncio.Event(),
        ticker_closed=asyncio.Event(),
        ticker_closed_in_rpc_task=None,
    )


_FAILURES = {
    b"invalid": lambda: InvalidArgument("must be between 1 and 4096, got 0", field="max_new_tokens"),
    b"range": lambda: OutOfRange("position 9 is past the end (8 tokens)"),
    b"notfound": lambda: NotFound("session abc expired", field="session_id"),
    b"value": lambda: ValueError("temperature must be >= 0"),
    b"runtime": lambda: RuntimeError("boom"),
    b"timeout": lambda: TimeoutError(),
    b"memory": lambda: MemoryError(),
    b"keyerror": lambda: KeyError("layer.7"),
    b"busy": lambda: ResourceExhausted("queue full", retry_delay_s=0.25),
}


def make_register(state: SimpleNamespace):
    """A register() for serve(): generic handlers with raw bytes (de)serializers."""

    async def echo(request: bytes, context) -> bytes:
        return request

    async def fail(request: bytes, context) -> bytes:
        if request == b"abort":
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "handler chose this status")
        raise _FAILURES[request]()

    async def slow(request: bytes, context) -> bytes:
        state.slow_started.set()
        await state.release.wait()
        state.slow_finished += 1
        return b"done"

    async def big(request: bytes, context) -> bytes:
        return b"x" * int(request)

    async def stream(request: bytes, context):
        for i in range(3):
            if request == b"fail" and i == 2:
                raise InvalidArgument(
                    "node 2 has parent 5, parents must precede children", field="tree.parents"
                )
            yield str(i).encode()

    async def ticker(request: bytes, context):
        task = asyncio.current_task()
        try:
            for i in range(int(request)):
                yield str(i).encode()
                await asyncio.sleep(0.01)
        finally:  # where the stream unwinds: the RPC's own task, or a finaliser's
            state.ticker_closed_in_rpc_task = asyncio.current_task() is task
            state.ticker_closed.set()

    async def writer_stream(request: bytes, context) -> None:
        for i in range(3):
            if request == b"fail" and i == 2:
                raise OutOfRange("ran past the cache")
            await context.write(str(i).encode())

    async def chat(request_iterator, context):
        async for message in request_iterator:
            if message == b"bad":
                raise ValueError("cannot parse 'bad'")
            yield message.upper()

    def ident(b: bytes) -> bytes:
        return b

    def unary(fn):
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=ident, response_serializer=ident)

    def unary_stream(fn):
        return grpc.unary_stream_rpc_method_handler(fn, request_deserializer=ident, response_serializer=ident)

    handlers = {
        "Echo": unary(echo),
        "Fail": unary(fail),
        "Slow": unary(slow),
        "Big": unary(big),
        "Stream": unary_stream(stream),
        "Ticker": unary_stream(ticker),
        "WriterStream": unary_stream(writer_stream),
        "Chat": grpc.stream_stream_rpc_method_handler(
            chat, request_deserializer=ident, response_serializer=ident
        ),
    }

    def register(server) -> list[str]:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        return [SERVICE]

    return register


def make_settings(**changes) -> ServerSettings:
    base = ServerSettings(host="127.0.0.1", port=0, grace_seconds=5.0, service_name="runtime-test")
    return base.replace(**changes)


@pytest.fixture
def probe() -> SimpleNamespace:
    """The test service: SERVICE name, method(name), make_state(), make_register(state), settings()."""
    return SimpleNamespace(
        SERVICE=SERVICE,
        method=method,
        make_state=make_state,
        make_register=make_register,
        settings=make_settings,
    )


@pytest.fixture
def arun():
    """Run a coroutine to completion in a fresh loop, failing (not hanging) after `timeout` s."""

    def run(coro, timeout: float = 8.0):
        async def bounded():
            return await asyncio.wait_for(coro, timeout)

        return asyncio.run(bounded())

    return run


@pytest.fixture
def quiet_telemetry():
    """Telemetry with no exporters that is not installed globally."""
    telemetry = setup_telemetry("runtime-test", "none", "none", install_global=False)
    yield telemetry
    telemetry.shutdown()
