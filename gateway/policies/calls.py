"""Upstream calls that carry a session: replica choice, re-prefill and failover in one place.

Every session-carrying call goes to the replica that holds the session (affinity). The call
is retried under a fresh session id with the whole sequence as new tokens (a re-prefill) when:

* the replica answers FAILED_PRECONDITION: it lost or never had the session (once per call);
* the replica is gone (UNAVAILABLE; CANCELLED that the gateway did not ask for, which is what
  a call in flight gets when its server stops; or its health watch reports it down): the
  session moves to the least-loaded other replica, which prefills the whole sequence;
* the replica is slow: the attempt's deadline (``ctx.timeout()``, bounded by the gateway's
  ``attempt_timeout_s``) fires while the request still has time and another replica is there;
  the slow one is left out of choice for a moment (as after UNAVAILABLE) and the session moves.

A replica whose engine queue is full answers RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo``;
the call waits the delay it asks for and tries again (at most ``BUSY_RETRIES`` times, and only
while the request's deadline leaves room), then passes the status, hint included, to the client.

A retried round sends the same random-stream counter, so it draws the same numbers: the
output is the one an uninterrupted request would have produced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from services.core.errors import Unavailable
from services.runtime.errors import retry_delay
from specmesh.v1 import common_pb2

from ..record import UpstreamSession
from .context import PolicyContext

log = logging.getLogger("specmesh.gateway")

BUSY_RETRIES = 3  # waits for a replica whose queue is full before its refusal reaches the client


def replica_gone(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a failed upstream call says its replica went away. A server that stops cancels
    the calls in flight, so the client sees CANCELLED; a call the gateway cancels itself raises
    ``asyncio.CancelledError`` instead and never reaches here."""
    return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def session_call(
    ctx: PolicyContext,
    method: str,
    make: Callable[[common_pb2.SessionRef], Any],
    session: UpstreamSession,
    sequence: list[int],
) -> Any:
    """``replica.stub.<method>(make(session.ref()))`` on `session`'s replica, re-prefilling
    `sequence` (what the session holds after its pending tokens) where it has to. The call's
    client span is a child of the current span."""
    pool = ctx.pools[session.role]
    failed: list[str] = []  # replicas that went away (or timed out) during this call
    resynced = False
    busy = 0
    last_error: grpc.aio.AioRpcError | None = None
    while True:
        try:
            replica = await pool.choose(session.replica, avoid=failed)
        except Unavailable:
            if last_error is not None:
                raise last_error from None
            raise
        if session.replica is not None and replica.address != session.replica:
            log.warning(
                "%s session %s moves from %s to %s (re-prefilling %d tokens)",
                session.role,
                session.session_id,
                session.replica,
                replica.address,
                len(sequence),
            )
            pool.moves += 1
            _abandon(ctx, session, sequence)  # its replica is gone: re-prefill elsewhere
        if session.replica is None:
            session.bind(replica.address)
            replica.sessions += 1
        try:
            return await getattr(replica.stub, method)(make(session.ref()), timeout=ctx.timeout())
        except grpc.aio.AioRpcError as exc:
            if replica_gone(exc) or (
                exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                and _retry_elsewhere(ctx, pool, failed, replica)
            ):
                pool.mark_down(replica, exc.code().name)
                failed.append(replica.address)
                last_error = exc
                continue
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and not resynced:
                resynced = True
                _abandon(ctx, session, sequence)
                continue
            wait = busy_wait(exc, ctx.deadline()) if busy < BUSY_RETRIES else None
            if wait is not None:
                busy += 1
                await asyncio.sleep(wait)
                continue
            raise


def busy_wait(exc: grpc.aio.AioRpcError, remaining_s: float | None) -> float | None:
    """The wait a RESOURCE_EXHAUSTED refusal asks for (its RetryInfo), when the request's time
    left (None: no deadline) leaves room for it and another attempt; None: do not retry."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    wait = retry_delay(exc)
    if wait is None or (remaining_s is not None and remaining_s < 2 * wait):
        return None
    return wait


def _retry_elsewhere(ctx: PolicyContext, pool, failed: list[str], replica) -> bool:
    """After an attempt's deadline: whether the request has time left and another replica to try."""
    remaining = ctx.deadline()
    others = [r for r in pool.replicas if r.address not in failed and r is not replica]
    return bool(others) and (remaining is None or remaining > 0)


def _abandon(ctx: PolicyContext, session: UpstreamSession, sequence: list[int]) -> None:
    """Release `session` where it is and start it over with the whole `sequence` pending."""
    if session.replica is not None:
        ctx.release(session.role, session.replica, session.session_id)
        session.opened.remove((session.replica, session.session_id))
    session.restart(sequence)
