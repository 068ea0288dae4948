"""What every policy loop gets besides its request record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry import trace

from services.core.tokenizer import Tokenizer
from services.runtime.protocol import FINISH_TO_PROTO
from specmesh.v1 import gateway_pb2

from .. import metrics as m
from ..config import GatewayConfig
from ..pool import UpstreamPool
from ..record import RequestRecord
from ..stops import OutputState


@dataclass
class PolicyContext:
    pools: dict[str, UpstreamPool]  # "target", and "draft" when the gateway has one
    tokenizer: Tokenizer
    config: GatewayConfig
    instruments: m.Instruments
    release: Callable[[str, str, str], None]  # (role, replica address, session id): Release later
    span: trace.Span  # the request's span; rounds and upstream calls are its children
    timeout: Callable[[], float | None]  # bound of one unary upstream call
    deadline: Callable[[], float | None]  # the client's remaining time (None: no deadline)
    # recent speculative path acceptance across requests (None: none measured yet); policy auto
    acceptance: Callable[[], float | None] | None = None

    def output(self, record: RequestRecord) -> OutputState:
        """Stop-rule state of `record`'s output, with the tokens it already emitted replayed."""
        out = OutputState(self.tokenizer, record.plan.params)
        out.feed(list(record.tokens))
        return out

    def release_all(self, record: RequestRecord, role: str) -> None:
        """Schedule the release of every session `record` opened on `role`'s replicas; a later
        continuation of `record` starts a fresh session there with the whole sequence."""
        session = record.upstreams.get(role)
        if session is not None:
            for replica, session_id in session.opened:
                self.release(role, replica, session_id)
            session.opened.clear()
            session.restart(record.sequence)


def chunk(tokens: list[int], text: str, out: OutputState) -> gateway_pb2.GenerateChunk:
    """A chunk of output; the one that completes the output carries its finish reason."""
    message = gateway_pb2.GenerateChunk(token_ids=tokens, text=text)
    if out.finish is not None:
        message.finish_reason = FINISH_TO_PROTO[out.finish]
    return message


def emit(record: RequestRecord, out: OutputState, tokens: list[int]) -> gateway_pb2.GenerateChunk:
    """Feed a round's tokens through the stop rules into `record` and make their chunk."""
    kept, text = out.feed(tokens)
    record.tokens += kept
    if out.finish is not None:
        record.finish = FINISH_TO_PROTO[out.finish]
    return chunk(kept, text, out)


__all__ = ["PolicyContext", "chunk", "emit"]
