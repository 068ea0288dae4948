"""A gateway relaying one role (scoring, image) to real replicas of that service, for the front
door tests: a toy target (the gateway needs one), the replicas on loopback, the gateway over
them, and stubs through the gateway and to the first replica directly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from servers import ServerThread

from gateway.server import GatewayOptions, start_gateway
from services.runtime.server import serve
from services.runtime.settings import ServerSettings


@contextmanager
def relayed(
    toy, role: str, servicers: list, start_replica: Callable[..., Any], stub_class: type
) -> Iterator[dict]:
    """Yields {"thread", "replicas", "target", "gateway", "via_gateway", "direct"}, every server
    stopped on exit. `role` is the GatewayOptions field listing the replicas' addresses."""
    state: dict = {}

    async def start():
        state["target"] = await serve(
            toy.register_target(toy.FakeTarget(toy.tokenizer)), toy.settings("toy-target")
        )
        state["replicas"] = [
            await start_replica(s, ServerSettings(host="127.0.0.1", port=0)) for s in servicers
        ]
        options = GatewayOptions(
            target=state["target"].address,
            tokenizer_dir=toy.tokenizer_dir,
            **{role: [r.address for r in state["replicas"]]},
        )
        state["gateway"] = await start_gateway(options, toy.settings("gw"))
        return state["gateway"]

    with ServerThread(start) as thread:
        gateway = grpc.insecure_channel(thread.address)
        direct = grpc.insecure_channel(state["replicas"][0].address)
        state.update(thread=thread, via_gateway=stub_class(gateway), direct=stub_class(direct))
        try:
            yield state
        finally:
            gateway.close()
            direct.close()
            for server in [*state["replicas"], state["target"]]:
                thread.call(server.stop(grace=0))
