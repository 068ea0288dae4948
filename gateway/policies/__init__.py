"""Generation policies: one module per policy, all behind :data:`LOOPS`.

A loop is an async generator ``loop(ctx, record)`` that yields ``GenerateChunk`` messages (the
last one carries the finish reason) and keeps every piece of request state in `record`
(:class:`gateway.record.RequestRecord`), so that a record taken between two chunks is enough to
continue the request. ``ctx`` (:class:`PolicyContext`) carries what the loops share: upstream
pools, tokenizer, configuration, telemetry and the request's span and deadlines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from services.core.strategies import Policy
from specmesh.v1 import gateway_pb2

from ..config import POLICY_BY_WIRE
from ..record import RequestRecord
from .auto import auto_loop
from .context import PolicyContext
from .draft import draft_loop
from .r2r import r2r_loop
from .speculative import speculative_loop
from .target import target_loop

Loop = Callable[[PolicyContext, RequestRecord], AsyncIterator[gateway_pb2.GenerateChunk]]

LOOPS: dict[Policy, Loop] = {
    Policy.TARGET: target_loop,
    Policy.DRAFT: draft_loop,
    Policy.SPECULATIVE: speculative_loop,
    Policy.R2R: r2r_loop,
    Policy.AUTO: auto_loop,
}


def run_policy(ctx: PolicyContext, record: RequestRecord) -> AsyncIterator[gateway_pb2.GenerateChunk]:
    """The chunks of `record`'s request under its plan's policy."""
    return LOOPS[POLICY_BY_WIRE[record.plan.policy]](ctx, record)


__all__ = ["LOOPS", "PolicyContext", "run_policy"]
