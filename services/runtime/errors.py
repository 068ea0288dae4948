"""Mapping exceptions to gRPC status codes (server side) and reading them back (client side).

Server side, :class:`ExceptionInterceptor` turns an exception escaping a handler into a
canonical status with a clear message:

=============================  =====================  ===========================================
exception                      status                 message
=============================  =====================  ===========================================
``SpecmeshError`` subclasses   its ``.code``          ``"field: message"`` (+ BadRequest detail)
``grpc.aio.AioRpcError``       the upstream code      ``"upstream call failed: <details>"``
``ValueError``                 INVALID_ARGUMENT       ``str(exc)``
``TimeoutError``               DEADLINE_EXCEEDED      ``str(exc)`` or "timed out"
``MemoryError``                RESOURCE_EXHAUSTED     ``"out of memory: ..."``
``NotImplementedError``        UNIMPLEMENTED          ``str(exc)``
anything else                  INTERNAL               ``"TypeName: message"`` (traceback logged)
=============================  =====================  ===========================================

When a ``SpecmeshError`` names a ``field``, the status carries a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer with one ``google.rpc.BadRequest`` field violation; a
``ResourceExhausted`` with a ``retry_delay_s`` adds a ``google.rpc.RetryInfo``.
Aborts made by the handler itself (``await context.abort(...)``) pass through untouched.

Client side, :func:`status_details` returns ``(code, message, field_violations)`` from any
``grpc.RpcError`` and :func:`retry_delay` the wait a RetryInfo asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from services.core.errors import InvalidArgument, ResourceExhausted, SpecmeshError

from ._handlers import call_unary, iterate, rewrap
from .utf8_fields import invalid_utf8_field

logger = logging.getLogger("specmesh.runtime.errors")

STATUS_DETAILS_KEY = "grpc-status-details-bin"
MAX_MESSAGE_CHARS = 2000  # status messages travel in an HTTP/2 header; keep them well under 8 KiB


class FieldViolation(NamedTuple):
    field: str
    description: str


class MappedError(NamedTuple):
    """What an exception becomes on the wire."""

    code: grpc.StatusCode
    message: str
    field_violations: tuple[FieldViolation, ...] = ()
    status_details: bytes | None = None  # a serialized google.rpc.Status to send as-is
    retry_delay_s: float | None = None  # a google.rpc.RetryInfo detail


def _code_named(name: str) -> grpc.StatusCode:
    try:
        code = grpc.StatusCode[name]
    except KeyError:
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.INTERNAL if code is grpc.StatusCode.OK else code


def _truncate(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 15] + " ...[truncated]"


def map_exception(exc: BaseException) -> MappedError:
    """The status an exception maps to (see the module docstring)."""
    if isinstance(exc, SpecmeshError):
        violations = ()
        if exc.field:
            violations = (FieldViolation(exc.field, exc.message),)
        retry = exc.retry_delay_s if isinstance(exc, ResourceExhausted) else None
        return MappedError(_code_named(exc.code), _truncate(str(exc)), violations, retry_delay_s=retry)
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        if code is grpc.StatusCode.OK:  # cannot happen for an error; be safe
            code = grpc.StatusCode.UNKNOWN
        details = _details_from_metadata(exc.trailing_metadata(), code)
        return MappedError(code, _truncate(f"upstream call failed: {exc.details()}"), (), details)
    if isinstance(exc, ValueError):
        return MappedError(grpc.StatusCode.INVALID_ARGUMENT, _truncate(str(exc) or type(exc).__name__))
    if isinstance(exc, TimeoutError):
        return MappedError(grpc.StatusCode.DEADLINE_EXCEEDED, _truncate(str(exc) or "timed out"))
    if isinstance(exc, MemoryError):
        return MappedError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, _truncate(f"out of memory: {exc}".rstrip(": "))
        )
    if isinstance(exc, NotImplementedError):
        return MappedError(grpc.StatusCode.UNIMPLEMENTED, _truncate(str(exc) or "not implemented"))
    text = str(exc)
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return MappedError(grpc.StatusCode.INTERNAL, _truncate(message))


def status_proto(
    code: grpc.StatusCode,
    message: str,
    field_violations: Iterable[FieldViolation] = (),
    retry_delay_s: float | None = None,
) -> status_pb2.Status:
    """A ``google.rpc.Status``; field violations go into one ``google.rpc.BadRequest`` detail,
    a retry delay into a ``google.rpc.RetryInfo``."""
    status = status_pb2.Status(code=code.value[0], message=message)
    violations = list(field_violations)
    if violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in violations
            ]
        )
        status.details.add().Pack(bad_request)
    if retry_delay_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(round(retry_delay_s * 1e9))
        status.details.add().Pack(retry)
    return status


def rich_status_metadata(
    code: grpc.StatusCode,
    message: str,
    field_violations: Iterable[FieldViolation] = (),
    retry_delay_s: float | None = None,
) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying the status details; empty when there are none."""
    violations = list(field_violations)
    if not violations and retry_delay_s is None:
        return ()
    status = status_proto(code, message, violations, retry_delay_s)
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """Abort the RPC with the status `exc` maps to (for handlers that catch errors themselves)."""
    mapped = map_exception(exc)
    if mapped.status_details is not None:
        trailing: Sequence[tuple[str, Any]] = ((STATUS_DETAILS_KEY, mapped.status_details),)
    else:
        trailing = rich_status_metadata(
            mapped.code, mapped.message, mapped.field_violations, mapped.retry_delay_s
        )
    await context.abort(mapped.code, mapped.message, trailing_metadata=tuple(trailing))
    raise AssertionError("context.abort returned")  # pragma: no cover


class ExceptionInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping grpc.aio handlers to canonical status codes.

    Handles unary and streaming requests and responses, both yielding and
    ``context.write`` style streams; an exception in the middle of a response stream ends
    the stream with the mapped status after the messages already sent.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        async def handle(context, exc: Exception) -> NoReturn:
            if isinstance(exc, grpc.aio.AbortError):
                raise exc  # the handler (or an inner interceptor) already chose the status
            mapped = map_exception(exc)
            if mapped.code is grpc.StatusCode.INTERNAL:
                logger.error("%s failed: %s", method, mapped.message, exc_info=exc)
            else:
                logger.debug("%s -> %s: %s", method, mapped.code.name, mapped.message)
            await abort_with(context, exc)

        def coro(behavior):
            async def wrapper(request, context):
                try:
                    _raise_if_undecodable(request)
                    return await call_unary(behavior, request, context)
                except Exception as exc:
                    await handle(context, exc)

            return wrapper

        def gen(behavior):
            async def wrapper(request, context):
                try:
                    _raise_if_undecodable(request)
                    async with aclosing(iterate(behavior, request, context)) as responses:
                        async for response in responses:
                            yield response
                except Exception as exc:
                    await handle(context, exc)

            return wrapper

        tolerant = None
        if not handler.request_streaming and handler.request_deserializer is not None:
            tolerant = _tolerant(handler.request_deserializer)
        return rewrap(handler, coro, gen, tolerant)


@dataclass(frozen=True)
class _Undecodable:
    """What a request that protobuf could not parse becomes, so the handler can refuse it."""

    error: str
    field: str | None  # the string field that is not UTF-8, when that is the cause


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserializer`, except that a message protobuf cannot parse (invalid UTF-8 in a string
    field, truncated bytes, a wrong wire type) becomes an :class:`_Undecodable` instead of an
    exception inside gRPC, which would answer INTERNAL with no word on what was wrong."""

    message_type = getattr(deserializer, "__self__", None)  # Message.FromString is a classmethod
    descriptor = getattr(message_type, "DESCRIPTOR", None)

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            field = invalid_utf8_field(descriptor, data) if descriptor is not None else None
            return _Undecodable(str(exc), field)

    return parse


def _raise_if_undecodable(request: Any) -> None:
    if isinstance(request, _Undecodable):
        if request.field:
            raise InvalidArgument("is not valid UTF-8", request.field)
        raise InvalidArgument(
            f"the request message cannot be parsed ({request.error}); string fields must be valid UTF-8"
        )


# ---------------------------------------------------------------------------------------------
# client side


def _metadata_value(metadata: Iterable[Any] | None, key: str) -> Any:
    for item in metadata or ():
        k, v = (item.key, item.value) if hasattr(item, "key") else item
        if k == key:
            return v
    return None


def _details_from_metadata(metadata: Iterable[Any] | None, code: grpc.StatusCode) -> bytes | None:
    raw = _metadata_value(metadata, STATUS_DETAILS_KEY)
    if raw is None:
        return None
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except Exception:  # malformed details are dropped, not fatal
        return None
    return raw if status.code == code.value[0] else None


def status_details(rpc_error: grpc.RpcError) -> tuple[grpc.StatusCode, str, list[FieldViolation]]:
    """``(code, message, field_violations)`` of a failed call (sync or aio).

    Field violations come from a ``google.rpc.BadRequest`` in ``grpc-status-details-bin``;
    details whose status code disagrees with the call's are ignored.
    """
    code = rpc_error.code()
    message = rpc_error.details() or ""
    violations: list[FieldViolation] = []
    raw = _details_from_metadata(rpc_error.trailing_metadata(), code)
    if raw is not None:
        status = status_pb2.Status()
        status.ParseFromString(raw)
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad_request.field_violations
                )
    return code, message, violations


def retry_delay(rpc_error: grpc.RpcError) -> float | None:
    """Seconds the server asks the caller to wait before retrying (a ``google.rpc.RetryInfo``
    in the status details), or None when it sent none."""
    raw = _details_from_metadata(rpc_error.trailing_metadata(), rpc_error.code())
    if raw is None:
        return None
    status = status_pb2.Status()
    status.ParseFromString(raw)
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None
