"""The status code an RPC ends with, as the server's interceptors see it."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio

_CODES_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def status_code(context, exc: BaseException | None) -> grpc.StatusCode:
    """The status the RPC ends with, as far as the server can tell."""
    code = None
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, int):
        code = _CODES_BY_VALUE.get(code)
    if code is not None:
        return code
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
