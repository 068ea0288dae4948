"""Server settings: defaults < `SPECMESH_*` environment variables < command-line flags.

Every field of :class:`ServerSettings` has an environment variable named
``SPECMESH_<FIELD NAME IN UPPER CASE>`` (``SPECMESH_PORT``, ``SPECMESH_MAX_MESSAGE_BYTES``,
``SPECMESH_GRACE_SECONDS`` ...) and a flag ``--<field-name-with-dashes>`` added by
:func:`add_server_args`. A value that cannot be parsed raises :class:`SettingsError`
naming the variable (or flag) and what was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "SPECMESH_"
MIB = 1024 * 1024
_GRPC_INT_MAX = 2**31 - 1


# `--max-concurrent-rpcs 0` must override the environment, so "no limit" given on the command
# line cannot be None (which means "flag not given").
_EXPLICIT_NONE: Any = object()


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the variable or flag."""


# ---------------------------------------------------------------------------------------------
# value parsers (shared by the environment and argparse paths)


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected a boolean (true/false, 1/0, yes/no, on/off)")


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(|b|k|ki|kib|m|mi|mib|g|gi|gib)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": MIB, "g": 1024 * MIB}


def parse_size(text: str) -> int:
    """Bytes as an integer, optionally with a binary suffix: ``65536``, ``64MiB``, ``512Ki``, ``1G``."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError("expected a byte count such as 67108864, 64MiB or 512KiB")
    number, unit = match.groups()
    return int(number) * _SIZE_UNITS[unit[:1].lower()]


def parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("expected an integer") from None


def parse_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number of seconds")
    return value


def parse_optional_int(text: str) -> int | None:
    """Empty, ``none`` or ``0`` mean "no limit"."""
    if text.strip().lower() in ("", "none", "0", "unlimited"):
        return None
    return parse_int(text)


LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_log_level(text: str) -> str:
    value = text.strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return value


def parse_optional_str(text: str) -> str | None:
    """Empty means unset."""
    return text.strip() or None


def parse_metrics_port(text: str) -> int | None:
    """Empty, ``none`` or ``off``: no Prometheus endpoint; a number: its port (0 = a free one)."""
    if text.strip().lower() in ("", "none", "off"):
        return None
    return parse_int(text)


def parse_str(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("expected a non-empty string")
    return value


# ---------------------------------------------------------------------------------------------


def _field(default: Any, parser: Callable[[str], Any], help: str, *, secret: bool = False) -> Any:
    # secret: kept out of repr(), so settings can be logged without leaking it
    return dataclasses.field(default=default, repr=not secret, metadata={"parse": parser, "help": help})


class _EnvSettings:
    """Construction shared by the settings dataclasses: defaults < environment < flags."""

    @staticmethod
    def _check(values: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(field, message) for every invalid value in `values` (all fields present)."""
        return []

    def __post_init__(self) -> None:
        problems = self._check(dataclasses.asdict(self))
        if problems:
            raise SettingsError(f"invalid {_words(type(self))}: " + "; ".join(msg for _, msg in problems))

    @classmethod
    def env_var(cls, field_name: str) -> str:
        return ENV_PREFIX + field_name.upper()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **defaults: Any):
        return cls.from_env_and_args(None, env=env, **defaults)

    @classmethod
    def from_env_and_args(
        cls,
        args: argparse.Namespace | None = None,
        *,
        env: Mapping[str, str] | None = None,
        **defaults: Any,
    ):
        """Build settings; precedence: flags in `args` > `SPECMESH_*` in `env` > `defaults` > built-in.

        `env` defaults to ``os.environ``; `defaults` lets a service pick its own defaults
        (``ServerSettings.from_env_and_args(args, service_name="draft", port=50052)``).
        Flags left at ``None`` (not given) fall through to the environment.
        """
        env = os.environ if env is None else env
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(defaults) - set(fields)
        if unknown:
            raise TypeError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
        values: dict[str, Any] = dict(defaults)
        sources: dict[str, str] = {}
        for name, f in fields.items():
            var = cls.env_var(name)
            raw = env.get(var)
            if raw is not None:
                try:
                    values[name] = f.metadata["parse"](raw)
                except ValueError as exc:
                    raise SettingsError(f"{var}={raw!r}: {exc}") from None
                sources[name] = f"{var}={raw!r}"
            if args is not None:
                flag_value = getattr(args, name, None)
                if flag_value is not None:
                    values[name] = None if flag_value is _EXPLICIT_NONE else flag_value
                    sources[name] = f"--{name.replace('_', '-')}={values[name]!r}"
        merged = {name: values.get(name, f.default) for name, f in fields.items()}
        problems = cls._check(merged)
        if problems:
            raise SettingsError(
                "; ".join(f"{sources[name]}: {msg}" if name in sources else msg for name, msg in problems)
            )
        return cls(**values)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


def _words(cls: type) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()


@dataclass(frozen=True)
class ServerSettings(_EnvSettings):
    """How a specmesh gRPC server binds, limits messages, keeps connections alive and shuts down."""

    host: str = _field("127.0.0.1", parse_str, "address to bind (0.0.0.0 or :: for all interfaces)")
    port: int = _field(0, parse_int, "TCP port; 0 picks a free ephemeral port")
    max_message_bytes: int = _field(
        64 * MIB, parse_size, "largest request or response message, in bytes (e.g. 64MiB)"
    )
    keepalive_time_ms: int = _field(
        30_000, parse_int, "interval between keepalive pings on an idle connection, ms"
    )
    keepalive_timeout_ms: int = _field(
        10_000, parse_int, "how long to wait for a ping ack before closing the connection, ms"
    )
    keepalive_permit_without_calls: bool = _field(
        True, parse_bool, "allow keepalive pings on connections with no active RPC"
    )
    min_ping_interval_without_data_ms: int = _field(
        10_000, parse_int, "shortest interval between client pings the server accepts, ms"
    )
    grace_seconds: float = _field(10.0, parse_float, "time in-flight RPCs get to finish on shutdown, s")
    drain_delay_seconds: float = _field(
        0.0, parse_float, "time between reporting NOT_SERVING and closing the listener on shutdown, s"
    )
    max_concurrent_rpcs: int | None = _field(
        None, parse_optional_int, "RPCs served at once before RESOURCE_EXHAUSTED (0/none: no limit)"
    )
    service_name: str = _field("specmesh", parse_str, "name reported to telemetry (service.name)")
    log_level: str = _field("info", parse_log_level, "log level: " + ", ".join(LOG_LEVELS))
    metrics_port: int | None = _field(
        None,
        parse_metrics_port,
        "serve Prometheus metrics over HTTP at http://HOST:PORT/metrics on this port (0 = a free "
        "port, logged; unset = no endpoint)",
    )
    # security (services/runtime/security.py)
    tls_cert_file: str | None = _field(
        None, parse_optional_str, "PEM certificate chain: serve TLS (and present it to TLS upstreams)"
    )
    tls_key_file: str | None = _field(None, parse_optional_str, "PEM private key of tls_cert_file")
    tls_client_ca_file: str | None = _field(
        None, parse_optional_str, "PEM CA: require client certificates it signed (mTLS)"
    )
    tls_ca_file: str | None = _field(
        None, parse_optional_str, "PEM CA: connect to upstream services with TLS, trusting it"
    )
    auth_token: str | None = _field(
        None,
        parse_optional_str,
        "bearer token every RPC but health checks must carry (prefer the environment variable: "
        "flags show in ps)",
        secret=True,
    )
    upstream_auth_token: str | None = _field(
        None, parse_optional_str, "bearer token sent to upstream services", secret=True
    )

    @staticmethod
    def _check(values: Mapping[str, Any]) -> list[tuple[str, str]]:
        return _problems(values)

    def configure_logging(self) -> None:
        """Process-wide logging at :attr:`log_level` (call once, in a server's main)."""
        logging.basicConfig(
            level=self.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
        )

    # -- gRPC channel arguments ------------------------------------------------------------------

    def server_options(self) -> list[tuple[str, int]]:
        """Channel arguments for ``grpc.aio.server(options=...)``."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", int(self.keepalive_permit_without_calls)),
            # Server side: accept client pings this often when no data flows (default 5 min).
            ("grpc.http2.min_ping_interval_without_data_ms", self.min_ping_interval_without_data_ms),
            # Linux gRPC sets SO_REUSEPORT by default, so a second server on a taken port would
            # silently share it; refuse instead.
            ("grpc.so_reuseport", 0),
        ]

    def channel_options(self) -> list[tuple[str, int]]:
        """Channel arguments for a client channel talking to a server with these settings."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", int(self.keepalive_permit_without_calls)),
            # Keep pinging an idle connection (default: stop after 2 pings without data).
            ("grpc.http2.max_pings_without_data", 0),
        ]


def _problems(v: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, message) for every invalid value in `v` (all fields present)."""
    out: list[tuple[str, str]] = []
    if not isinstance(v["host"], str) or not v["host"].strip():
        out.append(("host", "host must not be empty"))
    if not 0 <= v["port"] <= 65535:
        out.append(("port", f"port must be in 0..65535, got {v['port']}"))
    if not 0 < v["max_message_bytes"] <= _GRPC_INT_MAX:
        out.append(
            (
                "max_message_bytes",
                f"max_message_bytes must be in 1..{_GRPC_INT_MAX}, got {v['max_message_bytes']}",
            )
        )
    for name in ("keepalive_time_ms", "keepalive_timeout_ms", "min_ping_interval_without_data_ms"):
        if not 0 < v[name] <= _GRPC_INT_MAX:
            out.append((name, f"{name} must be a positive number of milliseconds, got {v[name]}"))
    if v["keepalive_time_ms"] < v["min_ping_interval_without_data_ms"]:
        # aio_channel() pings at keepalive_time_ms; a server that accepts pings less often
        # answers with GOAWAY "too_many_pings" and drops the connection.
        out.append(
            (
                "keepalive_time_ms",
                f"keepalive_time_ms ({v['keepalive_time_ms']}) must be >= min_ping_interval_without_data_ms "
                f"({v['min_ping_interval_without_data_ms']}), or clients using these settings are "
                "disconnected for pinging too often",
            )
        )
    if v["metrics_port"] is not None and not 0 <= v["metrics_port"] <= 65535:
        out.append(("metrics_port", f"metrics_port must be in 0..65535 or unset, got {v['metrics_port']}"))
    if v["metrics_port"] and v["metrics_port"] == v["port"]:
        out.append(("metrics_port", f"metrics_port must differ from port ({v['port']})"))
    for name in ("grace_seconds", "drain_delay_seconds"):
        if v[name] < 0:
            out.append((name, f"{name} must be >= 0, got {v[name]}"))
    if v["max_concurrent_rpcs"] is not None and v["max_concurrent_rpcs"] <= 0:
        out.append(
            (
                "max_concurrent_rpcs",
                f"max_concurrent_rpcs must be positive or unset, got {v['max_concurrent_rpcs']}",
            )
        )
    return out


@dataclass(frozen=True)
class EngineSettings(_EnvSettings):
    """Limits and batching of a model service (target, draft): what one engine takes on at once."""

    batching: bool = _field(
        True, parse_bool, "merge concurrent calls' forwards into one engine forward (dynamic batching)"
    )
    batch_window_ms: float = _field(
        2.0, parse_float, "longest wait for concurrent calls to join a forward, ms (none when idle)"
    )
    max_batch: int = _field(32, parse_int, "most calls merged into one forward")
    max_queue: int = _field(
        256, parse_int, "calls waiting for or on the engine before RESOURCE_EXHAUSTED with a retry hint"
    )
    max_sessions: int = _field(256, parse_int, "open sessions kept at once")
    session_ttl_seconds: float = _field(600.0, parse_float, "idle time after which a session expires, s")
    max_new_tokens: int = _field(4096, parse_int, "largest sampling.max_new_tokens of one Generate call")
    max_tree_nodes: int = _field(256, parse_int, "largest token tree one Verify accepts (tree.tokens)")
    prefix_cache_tokens: int = _field(
        4096,
        parse_int,
        "KV of finished requests kept in memory for prefix reuse, tokens; also the resident KV that "
        "cached and live blocks share before live ones touch new memory (bounds resident memory; "
        "Redis, when configured, keeps the rest)",
    )

    @staticmethod
    def _check(v: Mapping[str, Any]) -> list[tuple[str, str]]:
        out = []
        for name in ("max_batch", "max_queue", "max_sessions", "max_new_tokens", "max_tree_nodes"):
            if v[name] <= 0:
                out.append((name, f"{name} must be positive, got {v[name]}"))
        for name in ("batch_window_ms", "session_ttl_seconds", "prefix_cache_tokens"):
            if v[name] < 0:
                out.append((name, f"{name} must be >= 0, got {v[name]}"))
        return out


# ---------------------------------------------------------------------------------------------
# argparse


KV_STORAGE = ("exact", "bfloat16")


def parse_kv_storage(text: str) -> str:
    value = text.strip().lower()
    if value not in KV_STORAGE:
        raise ValueError(f"expected one of {', '.join(KV_STORAGE)}")
    return value


@dataclass(frozen=True)
class KVStoreSettings(_EnvSettings):
    """Where a model service shares its KV blocks (services.runtime.kv_store); no URL: nowhere."""

    redis_url: str | None = _field(
        None,
        parse_optional_str,
        "Redis / Valkey sharing KV blocks between replicas (redis://[:password@]host:port/db, "
        "rediss:// for TLS); unset: this process's cache only",
        secret=True,
    )
    kv_ttl_seconds: int = _field(3600, parse_int, "lifetime of a published KV block in Redis, s")
    kv_storage: str = _field(
        "exact", parse_kv_storage, "published KV precision: exact (as computed) or bfloat16 (half the bytes)"
    )
    kv_write_queue_blocks: int = _field(
        256, parse_int, "blocks waiting to be published before new ones are dropped (and counted)"
    )

    @staticmethod
    def _check(values: Mapping[str, Any]) -> list[tuple[str, str]]:
        return [
            (name, f"{name} must be positive, got {values[name]}")
            for name in ("kv_ttl_seconds", "kv_write_queue_blocks")
            if values[name] <= 0
        ]


def redact_url(url: str) -> str:
    """`url` without its password (for logs)."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


def _argparse_type(name: str, parser: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = parser(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return _EXPLICIT_NONE if value is None else value

    convert.__name__ = name  # argparse shows it in "invalid <name> value" messages
    return convert


def add_server_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, **defaults: Any) -> None:
    """Add ``--host``, ``--port``, ``--max-message-bytes``, ... (all default to None = not given).

    `defaults`: the service's own defaults, as it passes them to
    :meth:`ServerSettings.from_env_and_args`, so that ``--help`` shows the default that applies
    (the gateway's port 50050, not the built-in 0)."""
    _add_args(parser, ServerSettings, "server", "gRPC server", defaults)


def add_kv_store_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--redis-url``, ``--kv-ttl-seconds``, ... (KVStoreSettings)."""
    _add_args(parser, KVStoreSettings, "KV store", "KV blocks shared through Redis", {})


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--batching``, ``--batch-window-ms``, ``--max-queue``, ... (EngineSettings)."""
    _add_args(parser, EngineSettings, "engine", "limits and batching of the model engine", {})


def _add_args(
    parser, cls: type[_EnvSettings], title: str, description: str, defaults: dict[str, Any]
) -> None:
    unknown = set(defaults) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
    group = parser
    if isinstance(parser, argparse.ArgumentParser):
        group = parser.add_argument_group(title, f"{description} (environment: {ENV_PREFIX}<NAME>)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        help_text = f"{f.metadata['help']} [{cls.env_var(f.name)}, default {default!r}]"
        if f.metadata["parse"] is parse_bool:
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(
                flag,
                dest=f.name,
                type=_argparse_type(f.name, f.metadata["parse"]),
                default=None,
                metavar=f.name.upper(),
                help=help_text,
            )
