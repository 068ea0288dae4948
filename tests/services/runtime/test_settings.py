import argparse

import pytest

from services.runtime.settings import MIB, ServerSettings, SettingsError, add_server_args


def parse(argv, env=None, **defaults):
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    return ServerSettings.from_env_and_args(parser.parse_args(argv), env=env or {}, **defaults)


def test_defaults():
    s = ServerSettings.from_env({})
    assert (s.host, s.port, s.max_message_bytes) == ("127.0.0.1", 0, 64 * MIB)
    assert s.grace_seconds == 10.0
    assert s.max_concurrent_rpcs is None
    assert s.keepalive_permit_without_calls is True


def test_env_values_are_parsed():
    env = {
        "SPECMESH_HOST": "0.0.0.0",
        "SPECMESH_PORT": "50051",
        "SPECMESH_MAX_MESSAGE_BYTES": "8MiB",
        "SPECMESH_GRACE_SECONDS": "2.5",
        "SPECMESH_KEEPALIVE_PERMIT_WITHOUT_CALLS": "false",
        "SPECMESH_MAX_CONCURRENT_RPCS": "16",
        "SPECMESH_SERVICE_NAME": "draft",
        "UNRELATED": "x",
    }
    s = ServerSettings.from_env(env)
    assert s.host == "0.0.0.0"
    assert s.port == 50051
    assert s.max_message_bytes == 8 * MIB
    assert s.grace_seconds == 2.5
    assert s.keepalive_permit_without_calls is False
    assert s.max_concurrent_rpcs == 16
    assert s.service_name == "draft"


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("SPECMESH_PORT", "50099")
    monkeypatch.setenv("SPECMESH_MAX_MESSAGE_BYTES", "1048576")
    s = ServerSettings.from_env_and_args(None)
    assert (s.port, s.max_message_bytes) == (50099, MIB)


@pytest.mark.parametrize(
    ("var", "value", "expect"),
    [
        ("SPECMESH_PORT", "abc", "expected an integer"),
        ("SPECMESH_PORT", "70000", "port must be in 0..65535"),
        ("SPECMESH_MAX_MESSAGE_BYTES", "lots", "byte count"),
        ("SPECMESH_MAX_MESSAGE_BYTES", "0", "max_message_bytes must be"),
        ("SPECMESH_GRACE_SECONDS", "soon", "seconds"),
        ("SPECMESH_GRACE_SECONDS", "-1", "grace_seconds must be >= 0"),
        ("SPECMESH_KEEPALIVE_PERMIT_WITHOUT_CALLS", "maybe", "boolean"),
        ("SPECMESH_MAX_CONCURRENT_RPCS", "-3", "max_concurrent_rpcs must be positive"),
        ("SPECMESH_HOST", "  ", "non-empty"),
        ("SPECMESH_KEEPALIVE_TIME_MS", "1000", "min_ping_interval_without_data_ms"),
    ],
)
def test_bad_env_values_name_the_variable(var, value, expect):
    with pytest.raises(SettingsError) as info:
        ServerSettings.from_env({var: value})
    message = str(info.value)
    assert var in message
    assert expect in message


def test_flags_override_env_which_overrides_defaults():
    env = {"SPECMESH_PORT": "5000", "SPECMESH_GRACE_SECONDS": "3", "SPECMESH_MAX_CONCURRENT_RPCS": "4"}
    s = parse(
        [
            "--port",
            "6000",
            "--max-message-bytes",
            "1MiB",
            "--no-keepalive-permit-without-calls",
            "--max-concurrent-rpcs",
            "0",
        ],
        env,
        service_name="target",
        grace_seconds=7.0,
    )
    assert s.port == 6000  # flag beats env
    assert s.grace_seconds == 3.0  # env beats the service's default
    assert s.service_name == "target"  # the service's default beats the built-in one
    assert s.max_message_bytes == MIB
    assert s.keepalive_permit_without_calls is False
    assert s.max_concurrent_rpcs is None  # explicit "no limit" on the command line beats env


def test_flags_not_given_fall_through():
    assert parse([], {"SPECMESH_PORT": "5000"}).port == 5000


def test_bad_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parse(["--port", "http"])
    assert "--port" in capsys.readouterr().err


def test_out_of_range_flag_names_the_flag():
    with pytest.raises(SettingsError, match="--port=99999"):
        parse(["--port", "99999"])


def test_direct_construction_is_validated():
    with pytest.raises(SettingsError, match="port"):
        ServerSettings(port=-1)


def test_grpc_options_accept_client_pings():
    s = ServerSettings(keepalive_time_ms=20_000, min_ping_interval_without_data_ms=5_000)
    server = dict(s.server_options())
    assert server["grpc.http2.min_ping_interval_without_data_ms"] == 5_000
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.max_receive_message_length"] == s.max_message_bytes
    assert server["grpc.so_reuseport"] == 0
    client = dict(s.channel_options())
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    assert client["grpc.max_send_message_length"] == s.max_message_bytes


def test_log_level() -> None:
    assert ServerSettings.from_env({"SPECMESH_LOG_LEVEL": "DEBUG"}).log_level == "debug"
    with pytest.raises(SettingsError, match="SPECMESH_LOG_LEVEL='loud'.*debug, info, warning, error"):
        ServerSettings.from_env({"SPECMESH_LOG_LEVEL": "loud"})
