"""Transport security and bearer tokens for every specmesh server and client.

Server side (:class:`ServerSettings` fields, env ``SPECMESH_<NAME>``, flags ``--<name>``):

* ``tls_cert_file`` + ``tls_key_file``: serve TLS with this certificate chain and key (PEM);
* ``tls_client_ca_file``: also require client certificates signed by this CA (mTLS);
* ``auth_token``: require ``authorization: Bearer <token>`` on every RPC except the
  ``grpc.health.v1`` checks (probes carry no credentials); compared in constant time; a
  missing or wrong token is UNAUTHENTICATED.

Client side (channels a process opens to other specmesh servers):

* ``tls_ca_file``: connect with TLS, trusting servers signed by this CA; the process's own
  ``tls_cert_file`` / ``tls_key_file`` are presented as its client certificate (mTLS);
* ``upstream_auth_token``: the bearer token sent on every call.

Internal services use mTLS or a shared token between them; the gateway's ``auth_token`` is the
one its clients must send, its ``upstream_auth_token`` the internal one.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

HEALTH_PREFIX = "/grpc.health.v1.Health/"
AUTHORIZATION = "authorization"


class SecurityError(ValueError):
    """A certificate or key file cannot be used (the message names the setting)."""


def _read(path: str | None, setting: str) -> bytes | None:
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise SecurityError(f"{setting}: {path} is not a PEM file")
    return data


def server_credentials(settings: Any) -> grpc.ServerCredentials | None:
    """TLS (or mTLS) credentials from `settings`; None for a plaintext server."""
    cert = _read(settings.tls_cert_file, "tls_cert_file")
    key = _read(settings.tls_key_file, "tls_key_file")
    client_ca = _read(settings.tls_client_ca_file, "tls_client_ca_file")
    if cert is None and key is None:
        if client_ca is not None:
            raise SecurityError("tls_client_ca_file needs tls_cert_file and tls_key_file (mTLS is TLS first)")
        return None
    if cert is None or key is None:
        raise SecurityError("TLS needs both tls_cert_file and tls_key_file")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(settings: Any) -> grpc.ChannelCredentials | None:
    """TLS credentials for a client channel (None: plaintext): trust ``tls_ca_file`` and present
    this process's certificate when it has one (mTLS)."""
    ca = _read(settings.tls_ca_file, "tls_ca_file")
    if ca is None:
        return None
    cert = _read(settings.tls_cert_file, "tls_cert_file")
    key = _read(settings.tls_key_file, "tls_key_file")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# --- bearer tokens ------------------------------------------------------------------------------


def _unauthenticated(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses the call."""

    async def refuse_unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as a stream handler must be

    kinds: dict[tuple[bool, bool], tuple[Callable, Callable]] = {
        (False, False): (grpc.unary_unary_rpc_method_handler, refuse_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, refuse_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, refuse_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, refuse_stream),
    }
    make, refuse = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses RPCs without ``authorization: Bearer <token>`` (health checks excepted)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get(AUTHORIZATION)
        if sent is None:
            return _unauthenticated(handler, "this server requires a bearer token (authorization metadata)")
        if not hmac.compare_digest(sent.encode(), self._expected):
            return _unauthenticated(handler, "the bearer token is not valid for this server")
        return handler


class _WithToken:
    """Adds ``authorization: Bearer <token>`` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# One class per call kind: a grpc.aio channel files each interceptor under the first kind it
# is an instance of, so one class deriving from all four would only see unary-unary calls.
class _UnaryUnaryToken(_WithToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


class _UnaryStreamToken(_WithToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


class _StreamUnaryToken(_WithToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._with_token(client_call_details), request_iterator)


class _StreamStreamToken(_WithToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._with_token(client_call_details), request_iterator)


def server_interceptors(settings: Any) -> list[grpc.aio.ServerInterceptor]:
    return [TokenAuthInterceptor(settings.auth_token)] if settings.auth_token else []


def client_interceptors(settings: Any) -> list[grpc.aio.ClientInterceptor]:
    token = settings.upstream_auth_token
    if not token:
        return []
    return [
        kind(token) for kind in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)
    ]


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata carrying `token` for a blocking client's calls (``stub.Method(req, metadata=...)``)."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()
