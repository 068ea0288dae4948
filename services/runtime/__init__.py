"""gRPC plumbing shared by every specmesh server: serve(), health, reflection, interceptors,
telemetry and settings. No torch here (the gateway imports this package)."""

from .errors import ExceptionInterceptor, FieldViolation, map_exception, status_details
from .server import RunningServer, ServerStartError, aio_channel, run_forever, serve
from .settings import ServerSettings, SettingsError, add_server_args
from .telemetry import Telemetry, client_interceptors, server_interceptors, setup_telemetry

__all__ = [
    "ExceptionInterceptor",
    "FieldViolation",
    "RunningServer",
    "ServerSettings",
    "ServerStartError",
    "SettingsError",
    "Telemetry",
    "add_server_args",
    "aio_channel",
    "client_interceptors",
    "map_exception",
    "run_forever",
    "serve",
    "server_interceptors",
    "setup_telemetry",
    "status_details",
]
