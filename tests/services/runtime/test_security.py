"""TLS, mTLS and bearer tokens on a real loopback server (the runtime's probe service), with a
throwaway CA generated per test (tests/certs.py)."""

from __future__ import annotations

import grpc
import pytest
from certs import CertAuthority
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.security import call_metadata
from services.runtime.server import ServerStartError, aio_channel, serve
from services.runtime.settings import ServerSettings


def _ident(b: bytes) -> bytes:
    return b


async def _echo(channel: grpc.aio.Channel, method: str, payload: bytes = b"hi") -> bytes:
    call = channel.unary_unary(method, request_serializer=_ident, response_deserializer=_ident)
    return await call(payload, timeout=5)


async def _stream(channel: grpc.aio.Channel, method: str) -> list[bytes]:
    call = channel.unary_stream(method, request_serializer=_ident, response_deserializer=_ident)
    return [m async for m in call(b"ok", timeout=5)]


async def _code(coro) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_tls_and_mtls_round_trips(arun, probe, quiet_telemetry, tmp_path) -> None:
    ca, rogue = CertAuthority(tmp_path), CertAuthority(tmp_path, "rogue CA")
    server_cert = ca.issue("server", server=True)
    client_cert = ca.issue("client", server=False)
    stranger = rogue.issue("stranger", server=False)
    echo = probe.method("Echo")

    async def main() -> dict[str, grpc.StatusCode]:
        codes: dict[str, grpc.StatusCode] = {}
        tls = probe.settings(tls_cert_file=str(server_cert.cert), tls_key_file=str(server_cert.key))
        async with await serve(probe.make_register(probe.make_state()), tls, telemetry=quiet_telemetry) as s:
            client = ServerSettings(tls_ca_file=str(ca.ca))
            async with aio_channel(s.address, client) as channel:
                codes["tls"] = await _code(_echo(channel, echo))
            async with grpc.aio.insecure_channel(s.address) as channel:
                codes["plaintext client"] = await _code(_echo(channel, echo))
            async with aio_channel(s.address, ServerSettings(tls_ca_file=str(rogue.ca))) as channel:
                codes["untrusted server"] = await _code(_echo(channel, echo))

        mtls = tls.replace(tls_client_ca_file=str(ca.ca))
        async with await serve(probe.make_register(probe.make_state()), mtls, telemetry=quiet_telemetry) as s:
            with_cert = ServerSettings(
                tls_ca_file=str(ca.ca), tls_cert_file=str(client_cert.cert), tls_key_file=str(client_cert.key)
            )
            async with aio_channel(s.address, with_cert) as channel:
                codes["mtls"] = await _code(_echo(channel, echo))
            async with aio_channel(s.address, ServerSettings(tls_ca_file=str(ca.ca))) as channel:
                codes["no client cert"] = await _code(_echo(channel, echo))
            foreign = with_cert.replace(tls_cert_file=str(stranger.cert), tls_key_file=str(stranger.key))
            async with aio_channel(s.address, foreign) as channel:
                codes["client cert of another CA"] = await _code(_echo(channel, echo))
        return codes

    codes = arun(main())
    assert codes == {
        "tls": grpc.StatusCode.OK,
        "plaintext client": grpc.StatusCode.UNAVAILABLE,
        "untrusted server": grpc.StatusCode.UNAVAILABLE,
        "mtls": grpc.StatusCode.OK,
        "no client cert": grpc.StatusCode.UNAVAILABLE,
        "client cert of another CA": grpc.StatusCode.UNAVAILABLE,
    }


def test_bearer_token(arun, probe, quiet_telemetry) -> None:
    async def main() -> dict[str, object]:
        out: dict[str, object] = {}
        settings = probe.settings(auth_token="s3cret-token")
        async with await serve(
            probe.make_register(probe.make_state()), settings, telemetry=quiet_telemetry
        ) as s:
            async with aio_channel(s.address, ServerSettings()) as channel:
                out["none"] = await _code(_echo(channel, probe.method("Echo")))
                out["none, stream"] = await _code(_stream(channel, probe.method("Stream")))
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                out["health"] = health.status  # probes carry no token and still get an answer
            async with aio_channel(s.address, ServerSettings(upstream_auth_token="s3cret-tokeN")) as channel:
                out["wrong"] = await _code(_echo(channel, probe.method("Echo")))
            async with aio_channel(s.address, ServerSettings(upstream_auth_token="s3cret-token")) as channel:
                out["right"] = await _echo(channel, probe.method("Echo"))
                out["right, stream"] = await _stream(channel, probe.method("Stream"))
            async with grpc.aio.insecure_channel(s.address) as channel:  # a plain client's metadata
                call = channel.unary_unary(
                    probe.method("Echo"), request_serializer=_ident, response_deserializer=_ident
                )
                out["metadata"] = await call(b"m", timeout=5, metadata=call_metadata("s3cret-token"))
        return out

    out = arun(main())
    assert out["none"] == out["none, stream"] == out["wrong"] == grpc.StatusCode.UNAUTHENTICATED
    assert out["health"] == health_pb2.HealthCheckResponse.SERVING
    assert out["right"] == b"hi" and out["right, stream"] == [b"0", b"1", b"2"] and out["metadata"] == b"m"


def test_tokens_stay_out_of_repr_and_bad_files_are_one_line(arun, probe, quiet_telemetry, tmp_path) -> None:
    settings = ServerSettings(auth_token="hunter2", upstream_auth_token="hunter3")
    assert "hunter" not in repr(settings)
    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("hello")
    ca_only = CertAuthority(tmp_path).ca
    for changes, message in (
        (dict(tls_cert_file=str(not_pem), tls_key_file=str(not_pem)), "not a PEM file"),
        (dict(tls_cert_file=str(tmp_path / "missing.pem"), tls_key_file="k"), "cannot read"),
        (dict(tls_client_ca_file=str(ca_only)), "needs tls_cert_file"),
    ):
        with pytest.raises(ServerStartError, match=message):
            arun(
                serve(
                    probe.make_register(probe.make_state()),
                    probe.settings(**changes),
                    telemetry=quiet_telemetry,
                )
            )
