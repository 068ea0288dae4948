"""`specmesh protos`: regenerate (or --check) the committed gRPC stubs."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "protos", help="generate Python stubs from protos/specmesh/v1 (--check: fail if stale)"
    )
    p.add_argument(
        "--check", action="store_true", help="fail if the committed stubs differ from a fresh generation"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specmesh import protogen

    return protogen.main(["--check"] if args.check else [])
