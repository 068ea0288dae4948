"""serve(): health, reflection, limits, graceful drain and signals, on a real loopback server."""

import asyncio
import os
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.runtime.server import ServerStartError, aio_channel, run_forever, serve

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def check(channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return reply.status


async def wait_until(predicate, what: str, tries: int = 200) -> None:
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_health_and_reflection(arun, probe, quiet_telemetry):
    async def main():
        async with await serve(
            probe.make_register(probe.make_state()), probe.settings(), telemetry=quiet_telemetry
        ) as running:
            assert running.port > 0
            assert running.address == f"127.0.0.1:{running.port}"
            async with grpc.aio.insecure_channel(running.address) as channel:
                statuses = [await check(channel), await check(channel, probe.SERVICE)]
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await check(channel, "no.such.Service")
                assert info.value.code() == grpc.StatusCode.NOT_FOUND

                await running.set_serving(False, [probe.SERVICE])
                statuses += [await check(channel), await check(channel, probe.SERVICE)]

                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                replies = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=5)]
                # grpc.reflection.v1: the same messages under another package name
                v1 = channel.stream_stream(
                    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
                )
                symbol = reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="grpc.health.v1.Health"
                )
                v1_replies = [r async for r in v1(iter([request, symbol]), timeout=5)]
            names = {s.name for s in replies[0].list_services_response.service}
            return statuses, names, v1_replies

    statuses, names, v1_replies = arun(main())
    assert statuses == [SERVING, SERVING, SERVING, NOT_SERVING]
    assert names == {
        "specmesh.test.Probe",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert {s.name for s in v1_replies[0].list_services_response.service} == names
    files = v1_replies[1].file_descriptor_response.file_descriptor_proto
    assert files and any(b"grpc.health.v1" in f for f in files)


def test_watch_sees_not_serving_and_ends_on_stop(arun, probe, quiet_telemetry):
    # grace is long: if the open Watch held the drain, the test would time out
    async def main():
        running = await serve(
            probe.make_register(probe.make_state()),
            probe.settings(grace_seconds=60),
            telemetry=quiet_telemetry,
        )
        async with grpc.aio.insecure_channel(running.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=probe.SERVICE)
            )
            first = await watch.read()
            stopping = asyncio.ensure_future(running.stop())
            rest = []
            while (message := await watch.read()) is not grpc.aio.EOF:  # read() and async-for don't mix
                rest.append(message.status)
            code = await watch.code()
            await stopping
        return first.status, rest, code

    first, rest, code = arun(main())
    assert first == SERVING
    assert rest == [NOT_SERVING]
    assert code == grpc.StatusCode.OK


def test_check_reports_not_serving_during_drain_delay(arun, probe, quiet_telemetry):
    async def main():
        running = await serve(
            probe.make_register(probe.make_state()),
            probe.settings(drain_delay_seconds=0.8),
            telemetry=quiet_telemetry,
        )
        async with grpc.aio.insecure_channel(running.address) as channel:
            before = await check(channel)
            stopping = asyncio.ensure_future(running.stop())
            await wait_until(lambda: running.health.draining, "drain to start")
            during = [await check(channel), await check(channel, probe.SERVICE)]
            await stopping
        return before, during

    before, during = arun(main())
    assert before == SERVING
    assert during == [NOT_SERVING, NOT_SERVING]


def test_graceful_stop_lets_in_flight_rpc_finish(arun, probe, quiet_telemetry):
    async def main():
        state = probe.make_state()
        running = await serve(
            probe.make_register(state), probe.settings(grace_seconds=30), telemetry=quiet_telemetry
        )
        async with grpc.aio.insecure_channel(running.address) as channel:
            slow = asyncio.ensure_future(channel.unary_unary(probe.method("Slow"))(b"", timeout=10))
            await asyncio.wait_for(state.slow_started.wait(), 5)
            stopping = asyncio.ensure_future(running.stop())

            # new connections are refused once the listener closes ...
            refused = None
            for _ in range(200):
                try:
                    async with grpc.aio.insecure_channel(running.address) as fresh:
                        await fresh.unary_unary(probe.method("Echo"))(b"hi", timeout=1)
                except grpc.aio.AioRpcError as exc:
                    refused = exc.code()
                    break
                await asyncio.sleep(0.01)
            assert not stopping.done()
            # ... while the RPC in flight runs to completion
            state.release.set()
            reply = await slow
            await stopping
        return refused, reply, state.slow_finished

    refused, reply, finished = arun(main())
    # after the listener closes, connecting fails (UNAVAILABLE); a call racing the close is
    # cancelled by the server or, about 1 whole-file run in 10, left unanswered until its own
    # 1-second deadline: either way no new call is served
    assert refused in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    assert reply == b"done"
    assert finished == 1


def test_rpcs_still_running_after_grace_are_cancelled(arun, probe, quiet_telemetry):
    async def main():
        state = probe.make_state()
        running = await serve(probe.make_register(state), probe.settings(), telemetry=quiet_telemetry)
        async with grpc.aio.insecure_channel(running.address) as channel:
            slow = asyncio.ensure_future(channel.unary_unary(probe.method("Slow"))(b"", timeout=10))
            await asyncio.wait_for(state.slow_started.wait(), 5)
            await running.stop(grace=0.1)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await slow
        return info.value.code(), state.slow_finished

    code, finished = arun(main())
    assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert finished == 0


def test_message_size_limit(arun, probe, quiet_telemetry):
    async def main():
        settings = probe.settings(max_message_bytes=1024)
        async with await serve(
            probe.make_register(probe.make_state()), settings, telemetry=quiet_telemetry
        ) as running:
            codes = {}
            # a client with no limits of its own: the server refuses the request / the response
            async with grpc.aio.insecure_channel(running.address) as channel:
                assert await channel.unary_unary(probe.method("Echo"))(b"x" * 900, timeout=5) == b"x" * 900
                for name, request in (("Echo", b"x" * 5000), ("Big", b"5000")):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await channel.unary_unary(probe.method(name))(request, timeout=5)
                    codes[name] = info.value.code()
            # a client built from the same settings refuses to send it in the first place
            async with aio_channel(running.address, settings, telemetry=quiet_telemetry) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary(probe.method("Echo"))(b"x" * 5000, timeout=5)
                codes["client"] = info.value.code()
                codes["health"] = await check(channel)
        return codes

    codes = arun(main())
    assert codes == {
        "Echo": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Big": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "client": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "health": SERVING,
    }


def test_max_concurrent_rpcs(arun, probe, quiet_telemetry):
    async def main():
        state = probe.make_state()
        settings = probe.settings(max_concurrent_rpcs=1)
        async with (
            await serve(probe.make_register(state), settings, telemetry=quiet_telemetry) as running,
            grpc.aio.insecure_channel(running.address) as channel,
        ):
            slow = asyncio.ensure_future(channel.unary_unary(probe.method("Slow"))(b"", timeout=10))
            await asyncio.wait_for(state.slow_started.wait(), 5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(probe.method("Echo"))(b"hi", timeout=5)
            state.release.set()
            await slow
            after = await channel.unary_unary(probe.method("Echo"))(b"hi", timeout=5)
        return info.value.code(), after

    code, after = arun(main())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert after == b"hi"


def test_taken_port_is_an_error(arun, probe, quiet_telemetry):
    async def main():
        register = probe.make_register(probe.make_state())
        async with await serve(register, probe.settings(), telemetry=quiet_telemetry) as first:
            with pytest.raises(ServerStartError, match=f"127.0.0.1:{first.port}"):
                await serve(register, probe.settings(port=first.port), telemetry=quiet_telemetry)

    arun(main())


def test_register_may_be_async_and_must_return_service_names(arun, probe, quiet_telemetry):
    async def main():
        sync_register = probe.make_register(probe.make_state())

        async def register(server):
            await asyncio.sleep(0)
            return sync_register(server)

        async with await serve(register, probe.settings(), telemetry=quiet_telemetry) as running:
            assert running.service_names == (probe.SERVICE,)
        with pytest.raises(TypeError, match="full service names"):
            await serve(lambda server: ["/bad/name"], probe.settings(), telemetry=quiet_telemetry)

    arun(main())


def test_run_forever_drains_on_sigterm(arun, probe, quiet_telemetry):
    seen = {}

    async def on_start(running):
        async with grpc.aio.insecure_channel(running.address) as channel:
            seen["echo"] = await channel.unary_unary(probe.method("Echo"))(b"up", timeout=5)
        seen["running"] = running
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop's signal handler

    previous = signal.getsignal(signal.SIGTERM)
    arun(
        run_forever(
            probe.make_register(probe.make_state()),
            probe.settings(),
            telemetry=quiet_telemetry,
            on_start=on_start,
        )
    )
    assert seen["echo"] == b"up"
    assert seen["running"].health.draining
    assert signal.getsignal(signal.SIGTERM) == previous


def test_second_signal_cancels_in_flight_rpcs(arun, probe, quiet_telemetry):
    state = probe.make_state()
    seen = {}

    async def signal_twice(running):
        async with grpc.aio.insecure_channel(running.address) as channel:
            slow = asyncio.ensure_future(channel.unary_unary(probe.method("Slow"))(b"", timeout=10))
            await asyncio.wait_for(state.slow_started.wait(), 5)
            os.kill(os.getpid(), signal.SIGTERM)  # drain: would wait up to grace_seconds=60
            await wait_until(lambda: running.stopping, "the drain to start")
            os.kill(os.getpid(), signal.SIGTERM)  # give up on the RPC still running
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await slow
            seen["code"] = info.value.code()

    async def main():
        tasks = []
        await run_forever(
            probe.make_register(state),
            probe.settings(grace_seconds=60),
            telemetry=quiet_telemetry,
            on_start=lambda running: tasks.append(asyncio.ensure_future(signal_twice(running))),
        )
        await tasks[0]

    arun(main())
    assert seen["code"] in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert state.slow_finished == 0
