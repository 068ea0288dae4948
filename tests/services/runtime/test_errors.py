"""The exception interceptor on a real server: codes, messages, BadRequest details, streams."""

import grpc
import pytest
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.errors import InvalidArgument, OutOfRange
from services.runtime.errors import (
    STATUS_DETAILS_KEY,
    FieldViolation,
    map_exception,
    retry_delay,
    status_details,
)
from services.runtime.server import serve

CASES = [
    (
        b"invalid",
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens: must be between 1 and 4096, got 0",
        [FieldViolation("max_new_tokens", "must be between 1 and 4096, got 0")],
    ),
    (b"range", grpc.StatusCode.OUT_OF_RANGE, "position 9 is past the end (8 tokens)", []),
    (
        b"notfound",
        grpc.StatusCode.NOT_FOUND,
        "session_id: session abc expired",
        [FieldViolation("session_id", "session abc expired")],
    ),
    (b"value", grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0", []),
    (b"runtime", grpc.StatusCode.INTERNAL, "RuntimeError: boom", []),
    (b"keyerror", grpc.StatusCode.INTERNAL, "KeyError: 'layer.7'", []),
    (b"timeout", grpc.StatusCode.DEADLINE_EXCEEDED, "timed out", []),
    (b"memory", grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory", []),
    # the handler's own abort passes through untouched
    (b"abort", grpc.StatusCode.ALREADY_EXISTS, "handler chose this status", []),
]


async def _check_health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


@pytest.mark.parametrize(
    ("request_bytes", "code", "message", "violations"), CASES, ids=[c[0].decode() for c in CASES]
)
def test_unary_errors_map_to_status(arun, probe, quiet_telemetry, request_bytes, code, message, violations):
    async def main():
        state = probe.make_state()
        async with await serve(
            probe.make_register(state), probe.settings(), telemetry=quiet_telemetry
        ) as running:
            async with grpc.aio.insecure_channel(running.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary(probe.method("Fail"))(request_bytes, timeout=5)
            got = status_details(info.value)
            # the server is still healthy after the failure
            return got, await _check_health(running.address)

    (got_code, got_message, got_violations), health = arun(main())
    assert got_code == code
    assert got_message == message
    assert got_violations == violations
    assert health == health_pb2.HealthCheckResponse.SERVING


def test_errors_mid_stream(arun, probe, quiet_telemetry):
    async def main():
        async with await serve(
            probe.make_register(probe.make_state()), probe.settings(), telemetry=quiet_telemetry
        ) as running:
            results = {}
            async with grpc.aio.insecure_channel(running.address) as channel:
                for name in ("Stream", "WriterStream"):
                    got = []
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        async for message in channel.unary_stream(probe.method(name))(b"fail", timeout=5):
                            got.append(message)
                    results[name] = (got, status_details(info.value))

                # a stream that does not fail is untouched by the interceptor
                ok = [m async for m in channel.unary_stream(probe.method("Stream"))(b"ok", timeout=5)]
                ok_writer = [
                    m async for m in channel.unary_stream(probe.method("WriterStream"))(b"ok", timeout=5)
                ]

                got = []
                call = channel.stream_stream(probe.method("Chat"))(
                    iter([b"a", b"b", b"bad", b"c"]), timeout=5
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for message in call:
                        got.append(message)
                results["Chat"] = (got, status_details(info.value))
            return results, ok, ok_writer, await _check_health(running.address)

    results, ok, ok_writer, health = arun(main())
    assert results["Stream"] == (
        [b"0", b"1"],
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "tree.parents: node 2 has parent 5, parents must precede children",
            [FieldViolation("tree.parents", "node 2 has parent 5, parents must precede children")],
        ),
    )
    assert results["WriterStream"] == ([b"0", b"1"], (grpc.StatusCode.OUT_OF_RANGE, "ran past the cache", []))
    assert results["Chat"] == ([b"A", b"B"], (grpc.StatusCode.INVALID_ARGUMENT, "cannot parse 'bad'", []))
    assert ok == ok_writer == [b"0", b"1", b"2"]
    assert health == health_pb2.HealthCheckResponse.SERVING


def test_status_details_are_a_google_rpc_status(arun, probe, quiet_telemetry):
    async def main():
        async with await serve(
            probe.make_register(probe.make_state()), probe.settings(), telemetry=quiet_telemetry
        ) as running:
            async with grpc.aio.insecure_channel(running.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary(probe.method("Fail"))(b"invalid", timeout=5)
            return info.value

    error = arun(main())
    raw = dict(error.trailing_metadata())[STATUS_DETAILS_KEY]
    status = status_pb2.Status.FromString(raw)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == "max_new_tokens: must be between 1 and 4096, got 0"
    assert status.details[0].type_url == "type.googleapis.com/google.rpc.BadRequest"

    # an upstream failure relayed by a handler keeps its code and details
    mapped = map_exception(error)
    assert mapped.code == grpc.StatusCode.INVALID_ARGUMENT
    assert mapped.message.startswith("upstream call failed: max_new_tokens:")
    assert mapped.status_details == raw


def test_a_retry_delay_travels_as_retry_info(arun, probe, quiet_telemetry):
    async def main():
        async with await serve(
            probe.make_register(probe.make_state()), probe.settings(), telemetry=quiet_telemetry
        ) as running:
            async with grpc.aio.insecure_channel(running.address) as channel:
                errors = []
                for request in (b"busy", b"memory"):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await channel.unary_unary(probe.method("Fail"))(request, timeout=5)
                    errors.append(info.value)
            return errors

    busy, memory = arun(main())
    assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and busy.details() == "queue full"
    status = status_pb2.Status.FromString(dict(busy.trailing_metadata())[STATUS_DETAILS_KEY])
    assert [d.type_url for d in status.details] == ["type.googleapis.com/google.rpc.RetryInfo"]
    assert retry_delay(busy) == 0.25
    assert retry_delay(memory) is None  # waiting would not help: no hint


def test_map_exception_table():
    assert map_exception(InvalidArgument("bad", field="f")).field_violations == (FieldViolation("f", "bad"),)
    assert map_exception(OutOfRange("x")).code == grpc.StatusCode.OUT_OF_RANGE
    assert map_exception(NotImplementedError()).code == grpc.StatusCode.UNIMPLEMENTED
    assert map_exception(ValueError()).message == "ValueError"
    long = map_exception(RuntimeError("y" * 10_000)).message
    assert len(long) <= 2000 and long.endswith("[truncated]")
