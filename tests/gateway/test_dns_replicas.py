"""One DNS name, several replicas: what the chart's headless Service gives the gateway.

In Kubernetes, `--target rel-specmesh-target:50051` names a headless Service whose DNS answer is
every ready target pod. Here two real (toy) target servers listen on 127.0.0.1 and 127.0.0.2
(both loopback on Linux) on the same port, and a test resolver makes one name answer with both
addresses (socket.getaddrinfo patched for that name only; every other name resolves as usual).
The real gateway, given only that name, builds a pool of two replicas and serves requests on both.
"""

from __future__ import annotations

import socket
import time

import grpc
import pytest
from servers import ServerThread

from gateway.server import GatewayOptions, start_gateway
from services.runtime.server import serve
from services.runtime.settings import ServerSettings
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

NAME = "specmesh-target.headless.test"  # stands for the chart's headless Service
HOSTS = ("127.0.0.1", "127.0.0.2")
MAX_NEW = 40


@pytest.fixture
def one_name_two_targets(toy, monkeypatch):
    real_getaddrinfo = socket.getaddrinfo
    answer = list(HOSTS)  # what the name resolves to now (a test scales it down below)

    def resolver(host, port, *args, **kwargs):
        if host == NAME:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (h, int(port))) for h in answer]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    # Verify takes 20 ms, so a request holds its session over several rounds
    fakes = [toy.FakeTarget(toy.tokenizer, delay_s=0.02) for _ in HOSTS]
    state: dict = {}

    async def start():
        first = await serve(
            toy.register_target(fakes[0]), ServerSettings(host=HOSTS[0], port=0, grace_seconds=0)
        )
        port = first.port
        try:  # the same port on the second loopback address, as pods of one Service share a port
            second = await serve(
                toy.register_target(fakes[1]), ServerSettings(host=HOSTS[1], port=port, grace_seconds=0)
            )
        except Exception as exc:
            await first.stop(grace=0)
            pytest.skip(f"cannot bind {HOSTS[1]}:{port} ({exc}); the host has no 127.0.0.2 loopback")
        draft = await serve(toy.register_draft(toy.FakeDraft()), toy.settings("toy-draft"))
        state.update(targets=[first, second], draft=draft, port=port)
        # re-resolved every 0.2 s here (30 s in production) so that scaling shows within the test
        options = GatewayOptions(
            target=f"{NAME}:{port}", draft=draft.address, tokenizer_dir=toy.tokenizer_dir, resolve_every_s=0.2
        )
        state["gateway"] = await start_gateway(options, toy.settings("gw"))
        return state["gateway"]

    with ServerThread(start) as thread:
        with grpc.insecure_channel(thread.address) as channel:
            state.update(
                thread=thread, stub=gateway_pb2_grpc.GatewayStub(channel), fakes=fakes, answer=answer
            )
            yield state
        for server in [*state["targets"], state["draft"]]:
            thread.call(server.stop(grace=0))


def _request() -> gateway_pb2.GatewayGenerateRequest:
    return gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(text="w5 w9 w11"),
        sampling=common_pb2.SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True),
        policy=gateway_pb2.POLICY_SPECULATIVE,
    )


def test_one_name_resolves_to_a_pool_of_two_replicas_that_both_serve(one_name_two_targets) -> None:
    state = one_name_two_targets
    stub, port = state["stub"], state["port"]
    pool = state["gateway"].servicer.pools["target"]
    assert [r.address for r in pool.replicas] == [f"{h}:{port}" for h in HOSTS]

    # two requests at once: the second goes to the less loaded replica, the other address
    first = stub.GenerateStream(_request(), timeout=30)
    tokens_first = list(next(first).token_ids)  # its session is now open on one replica
    (busy,) = [r for r in pool.replicas if r.sessions == 1]
    second = stub.Generate(_request(), timeout=30)
    tokens_first += [t for chunk in first for t in chunk.token_ids]

    assert len(second.token_ids) == MAX_NEW and tokens_first == list(second.token_ids)
    served = [any(name == "Verify" for name, _ in fake.calls) for fake in state["fakes"]]
    assert served == [True, True], "both addresses behind the one name served requests"
    assert busy.address in {f"{h}:{port}" for h in HOSTS}
    assert all(r.healthy for r in pool.replicas)  # each replica's grpc.health.v1 watch says SERVING


def test_the_pool_follows_the_name_when_replicas_go(one_name_two_targets) -> None:
    """Scaling down: the name stops answering with 127.0.0.2, the pool drops that replica at the
    next re-resolution, and requests keep succeeding on the one left."""
    state = one_name_two_targets
    pool = state["gateway"].servicer.pools["target"]
    assert len(pool.replicas) == 2
    state["answer"][:] = [HOSTS[0]]
    deadline = time.monotonic() + 10
    while len(pool.replicas) != 1:
        assert time.monotonic() < deadline, "the pool kept the replica the name no longer lists"
        time.sleep(0.05)
    assert pool.replicas[0].address == f"{HOSTS[0]}:{state['port']}"
    assert len(state["stub"].Generate(_request(), timeout=30).token_ids) == MAX_NEW
