"""`specmesh health ADDR [--service NAME]`: ask a server's grpc.health.v1 Check, exit 0 if SERVING.

The container healthcheck of every specmesh gRPC service (docker-compose.yml): the gateway image
has no grpc_health_probe binary and no torch, and this needs only grpcio-health-checking, a base
dependency. Kubernetes asks the same health service through its native `grpc:` probes.
Exit codes: 0 SERVING, 1 any other status (NOT_SERVING, SERVICE_UNKNOWN), 2 no answer.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "health",
        help="check a server's grpc.health.v1 status (exit 0 when SERVING)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("address", metavar="ADDR", help="host:port of the server")
    p.add_argument(
        "--service",
        default="",
        help="health entry to ask, e.g. specmesh.v1.TargetService (default: '', the whole server)",
    )
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    request = health_pb2.HealthCheckRequest(service=args.service)
    with grpc.insecure_channel(args.address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
