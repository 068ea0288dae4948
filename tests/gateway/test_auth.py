"""Tokens through the stack: clients must send the gateway's token; the gateway sends the
internal token to target and draft services that require it (toy services, real runtime)."""

from __future__ import annotations

import grpc
import pytest
from servers import ServerThread

from gateway.server import GatewayOptions, start_gateway
from services.runtime.security import call_metadata
from services.runtime.server import serve
from specmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

PUBLIC, INTERNAL = "public-token", "internal-token"


@pytest.mark.parametrize(
    "upstream_token, expected",
    # a stale internal token: the services refuse the gateway, and the client is told so
    [(INTERNAL, grpc.StatusCode.OK), ("stale-token", grpc.StatusCode.UNAUTHENTICATED)],
)
def test_gateway_and_internal_tokens(toy, upstream_token, expected) -> None:
    state: dict = {}

    async def start():
        internal = toy.settings("toy").replace(auth_token=INTERNAL)
        state["target"] = await serve(toy.register_target(toy.FakeTarget(toy.tokenizer)), internal)
        state["draft"] = await serve(toy.register_draft(toy.FakeDraft()), internal)
        options = GatewayOptions(
            target=state["target"].address, draft=state["draft"].address, tokenizer_dir=toy.tokenizer_dir
        )
        settings = toy.settings("gw").replace(auth_token=PUBLIC, upstream_auth_token=upstream_token)
        state["gateway"] = await start_gateway(options, settings)
        return state["gateway"]

    request = gateway_pb2.GatewayGenerateRequest(
        prompt=common_pb2.Prompt(text="w5 w9"), sampling=common_pb2.SamplingParams(max_new_tokens=8)
    )
    with ServerThread(start) as thread, grpc.insecure_channel(thread.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.Generate(request, timeout=10)
        with pytest.raises(grpc.RpcError) as internal_token:  # the internal token is not the public one
            stub.Generate(request, timeout=10, metadata=call_metadata(INTERNAL))
        try:
            reply, code = (
                stub.Generate(request, timeout=10, metadata=call_metadata(PUBLIC)),
                grpc.StatusCode.OK,
            )
        except grpc.RpcError as exc:
            reply, code = None, exc.code()
        for name in ("draft", "target"):
            thread.call(state[name].stop(grace=0))
    assert missing.value.code() == internal_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert code == expected
    assert (reply is not None and len(reply.token_ids) == 8) == (expected == grpc.StatusCode.OK)
