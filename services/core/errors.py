"""Domain errors raised by the engine and servicers.

They carry the offending field so the runtime's exception interceptor can map each
one to a canonical gRPC status (and a `google.rpc.BadRequest` detail) without the
engine importing gRPC.
"""

from __future__ import annotations


class SpecmeshError(Exception):
    """Base class; `code` names the canonical gRPC status (grpc.StatusCode member name)."""

    code = "INTERNAL"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(SpecmeshError):
    code = "INVALID_ARGUMENT"


class OutOfRange(SpecmeshError):
    code = "OUT_OF_RANGE"


class FailedPrecondition(SpecmeshError):
    code = "FAILED_PRECONDITION"


class NotFound(SpecmeshError):
    code = "NOT_FOUND"


class ResourceExhausted(SpecmeshError):
    """retry_delay_s: how long the caller should wait before trying again, when waiting helps
    (a full queue drains; a session limit does not), sent as a ``google.rpc.RetryInfo``."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, field: str | None = None, *, retry_delay_s: float | None = None) -> None:
        super().__init__(message, field)
        self.retry_delay_s = retry_delay_s


class Unavailable(SpecmeshError):
    code = "UNAVAILABLE"
