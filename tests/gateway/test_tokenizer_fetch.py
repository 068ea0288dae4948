"""The gateway fetches its tokenizer from the target (TargetService.GetTokenizer) on first use:
once, sha256 checked, with a clear status when the target is unreachable or serves a bad one."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from gateway.servicer import GatewayServicer
from services.core.errors import FailedPrecondition, Unavailable
from services.core.tokenizer import Tokenizer, encode_sources
from specmesh.v1 import target_pb2, target_pb2_grpc


class _FakeTarget:
    """A target stub whose GetTokenizer returns `reply` (or raises it) and counts its calls."""

    def __init__(self, reply) -> None:
        self.reply, self.calls = reply, 0

    async def GetTokenizer(self, request, timeout=None):
        self.calls += 1
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


def _reply(tok: Tokenizer, *, corrupt: bool = False) -> target_pb2.GetTokenizerResponse:
    tj, cj, digest = encode_sources(tok)
    return target_pb2.GetTokenizerResponse(
        tokenizer_json=tj, tokenizer_config_json=cj + (b" " if corrupt else b""), sha256=digest
    )


def test_fetched_once_and_equal_to_the_served_one(toy) -> None:
    target = _FakeTarget(_reply(toy.tokenizer))
    servicer = GatewayServicer(target)

    async def main() -> list[Tokenizer]:
        return list(await asyncio.gather(*(servicer.tokenizer() for _ in range(4))))

    toks = asyncio.run(main())
    assert target.calls == 1 and all(t is toks[0] for t in toks)
    messages = [{"role": "user", "content": "hello there"}]
    assert toks[0].encode_chat(messages) == toy.tokenizer.encode_chat(messages)
    assert toks[0].eos_token_ids == toy.tokenizer.eos_token_ids


def test_a_digest_mismatch_is_a_failed_precondition(toy) -> None:
    servicer = GatewayServicer(_FakeTarget(_reply(toy.tokenizer, corrupt=True)))
    with pytest.raises(FailedPrecondition, match="unusable tokenizer.*sha256"):
        asyncio.run(servicer.tokenizer())


def test_a_target_without_get_tokenizer_is_a_failed_precondition() -> None:
    err = grpc.aio.AioRpcError(grpc.StatusCode.UNIMPLEMENTED, None, None, details="Method not found!")
    servicer = GatewayServicer(_FakeTarget(err))
    with pytest.raises(FailedPrecondition, match="cannot fetch the tokenizer.*UNIMPLEMENTED.*--tokenizer"):
        asyncio.run(servicer.tokenizer())


def test_an_unreachable_target_is_unavailable() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await GatewayServicer(target_pb2_grpc.TargetServiceStub(channel)).tokenizer()

    with pytest.raises(Unavailable, match="cannot fetch the tokenizer from the target .UNAVAILABLE"):
        asyncio.run(main())
