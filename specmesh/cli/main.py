"""`specmesh` command line: one entry point, one subcommand module per area.

Heavy imports (torch, grpc) happen inside each subcommand so `specmesh --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module under specmesh.cli that defines add_parser(subparsers) (a module may add several)
SUBCOMMANDS = {
    "quickstart": "quickstart",
    "up": "up",
    "generate": "generate",
    "image": "image",
    "models": "models",
    "train": "train",
    "serve": "serve",
    "health": "health",
    "attribute": "attribute",
    "detect": "score",
    "membership": "score",
    "uncertainty": "score",
    "bench": "bench",
    "protos": "protos",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specmesh",
        description="specmesh: speculative generation served as gRPC microservices.",
        epilog="Environment: SPECMESH_MODEL_DIR (model directory, default ~/.cache/specmesh/models), "
        "SPECMESH_HOST / SPECMESH_PORT / ... (server settings), OTEL_* (telemetry).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in dict.fromkeys(SUBCOMMANDS.values()):
        importlib.import_module(f"specmesh.cli.{module}").add_parser(sub)
    return parser


def _foreseeable() -> tuple[type[BaseException], ...]:
    """Errors that are a user's to fix (a taken port, a bad setting or file): one line, no traceback."""
    from services.core.errors import SpecmeshError
    from services.runtime.security import SecurityError
    from services.runtime.server import ServerStartError
    from services.runtime.settings import SettingsError
    from services.runtime.telemetry import TelemetryConfigError

    return (SpecmeshError, SecurityError, ServerStartError, SettingsError, TelemetryConfigError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not isinstance(exc, _foreseeable()):
            raise
        message = getattr(exc, "message", None) or str(exc)
        print(f"specmesh {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
