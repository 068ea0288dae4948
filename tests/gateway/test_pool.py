"""Upstream pools: address specs, name resolution, choice (affinity, load, health), health watching."""

from __future__ import annotations

import asyncio
import time

import pytest
from servers import ServerThread

from gateway.pool import Replica, UpstreamPool, resolve, split_addresses
from services.core.errors import Unavailable
from services.runtime.server import aio_channel, serve
from specmesh.v1 import target_pb2_grpc

TARGET = "specmesh.v1.TargetService"


def test_split_addresses() -> None:
    assert split_addresses("a:1, b:2,,a:1") == ["a:1", "b:2"]
    assert split_addresses(["a:1", "b:2,c:3"]) == ["a:1", "b:2", "c:3"]
    assert split_addresses(None) == []


def test_resolve_names_and_literals() -> None:
    assert resolve("10.1.2.3:50051") == ["10.1.2.3:50051"]
    assert resolve("[::1]:50051") == ["[::1]:50051"]
    # localhost has an IPv4 and usually an IPv6 answer: IPv4 is preferred, each address once
    assert resolve("localhost:50051") == ["127.0.0.1:50051"]
    assert resolve("no-such-host.invalid:1") == []
    with pytest.raises(ValueError, match="host:port"):
        resolve("just-a-host")


def _pool(*loads: int) -> UpstreamPool:
    return UpstreamPool("target", [Replica(f"r{i}:1", stub=None, sessions=n) for i, n in enumerate(loads)])


def test_pick_prefers_affinity_then_least_loaded() -> None:
    pool = _pool(3, 1, 1)
    assert pool.pick().address == "r1:1"  # least loaded, first of equals
    assert pool.pick("r0:1").address == "r0:1"  # affinity beats load
    assert pool.pick(avoid=["r1:1"]).address == "r2:1"


def test_pick_skips_replicas_that_are_down_until_none_is_left() -> None:
    pool = _pool(0, 5)
    pool.replicas[0].healthy = False
    assert pool.pick("r0:1").address == "r1:1"  # affinity does not keep an unhealthy replica
    pool.mark_down(pool.replicas[1])
    assert pool.replicas[1].down_until > time.monotonic()
    # nothing available: the least loaded of the rest is tried anyway (a call fails fast if it is down)
    assert pool.pick().address == "r0:1"
    with pytest.raises(Unavailable, match="no target replica answers"):
        pool.pick(avoid=["r0:1", "r1:1"])


def test_choose_waits_for_a_replica_to_come_up() -> None:
    pool = _pool(0, 5)
    for replica in pool.replicas:
        replica.healthy = False

    async def scenario() -> tuple[str, str]:
        async def recover() -> None:
            await asyncio.sleep(0.1)
            pool.replicas[1].healthy = True  # what its health watch does when it answers SERVING

        task = asyncio.create_task(recover())
        chosen = await pool.choose()
        await task
        # with nothing available for its whole wait, the least loaded is tried anyway
        pool.replicas[1].healthy = False
        fallback = await pool.choose(wait_s=0.05)
        return chosen.address, fallback.address

    assert asyncio.run(scenario()) == ("r1:1", "r0:1")


def _wait(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_health_watch_follows_a_real_server(toy) -> None:
    """A replica turns unhealthy when its server reports NOT_SERVING or goes away."""
    state: dict = {}

    async def start():
        state["server"] = await serve(toy.register_target(toy.FakeTarget(toy.tokenizer)), toy.settings("t"))
        return state["server"]

    with ServerThread(start) as thread:
        address = thread.address

        async def connect() -> UpstreamPool:
            def channel(addr: str):
                ch = aio_channel(addr)
                return ch, target_pb2_grpc.TargetServiceStub(ch)

            # the same server twice: once by IP literal, once by a name that resolves to it
            port = address.rsplit(":", 1)[1]
            return UpstreamPool.connect(
                "target", [address, f"localhost:{port}"], service_name=TARGET, connect=channel
            )

        pool = thread.call(connect())
        assert [r.address for r in pool.replicas] == [address]  # one replica: the name resolved to it
        replica = pool.replicas[0]
        _wait(lambda: replica.watch is not None and replica.healthy)
        thread.call(state["server"].set_serving(False, [TARGET]))
        _wait(lambda: not replica.healthy)
        thread.call(state["server"].set_serving(True, [TARGET]))
        _wait(lambda: replica.healthy)
        thread.call(state["server"].stop(grace=0))
        _wait(lambda: not replica.healthy)
        thread.call(pool.close())
        thread.call(asyncio.sleep(0))
