"""One ScoringService call from a command: through a running service or the gateway's front door
(--address), or in-process on --model when no address is given. Shared by `specmesh attribute`,
`detect`, `membership` and `uncertainty`."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

ENV_ADDRESS = "SPECMESH_SCORING_ADDRESS"
DEFAULT_MODEL = "smollm2-135m-instruct"


def add_service_arguments(p: argparse.ArgumentParser, *, observer: bool = False) -> None:
    """--model, --address, --timeout (and --observer for in-process Binoculars)."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="scored model (default: %(default)s)")
    if observer:
        p.add_argument(
            "--observer",
            default=None,
            help="in-process only: Binoculars' observer, sharing --model's tokenizer (e.g. "
            "smollm2-135m-instruct-draft); without it BINOCULARS is not computed",
        )
    p.add_argument(
        "--address",
        default=os.environ.get(ENV_ADDRESS),
        metavar="ADDR",
        help="host:port of a scoring service (specmesh serve scoring) or of a gateway started with "
        f"--scoring (`specmesh up --scoring`); unset = run in-process on --model [{ENV_ADDRESS}]",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds (default: %(default)s)")


def call(args: argparse.Namespace, method: str, request: Any, command: str) -> Any | None:
    """The reply of ScoringService.<method>(request), or None after printing why it failed."""
    return _remote(args, method, request, command) if args.address else _local(args, method, request)


def _local(args: argparse.Namespace, method: str, request: Any) -> Any:
    import asyncio

    from services.scoring.server import load_scoring

    # a refused request raises a SpecmeshError, which `specmesh` prints as one line
    servicer = load_scoring(args.model, observer=getattr(args, "observer", None))
    try:
        return asyncio.run(getattr(servicer, method)(request, None))
    finally:
        servicer.close()


def _remote(args: argparse.Namespace, method: str, request: Any, command: str) -> Any | None:
    import grpc

    from specmesh.v1 import scoring_pb2_grpc

    with grpc.insecure_channel(args.address) as channel:
        try:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            return getattr(stub, method)(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"specmesh {command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return None


def json_number(x: float) -> float | None:
    """A score for JSON output: rounded to 6 decimals, NaN (undefined) as null."""
    return None if math.isnan(x) else round(x, 6)


def write_page(path: str, what: str, args: argparse.Namespace, **sections: dict) -> None:
    """Write the token page (specmesh.token_page) and say where, on stderr (stdout may be --json)."""
    from specmesh import token_page

    where = args.address or "in-process"
    page = token_page.render(f"{what} of {args.model}", f"scored by {where}", **sections)
    print(f"wrote {token_page.write(path, page)}", file=sys.stderr)


def prompt_from_args(args: argparse.Namespace):
    """--text, or --file (``-`` = stdin), as a plain-text Prompt."""
    from specmesh.v1 import common_pb2

    if args.file is None:
        return common_pb2.Prompt(text=args.text)
    if args.file == "-":
        return common_pb2.Prompt(text=sys.stdin.read())
    try:
        return common_pb2.Prompt(text=Path(args.file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise SystemExit(f"specmesh: cannot read --file {args.file}: {why}") from None


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", help="the text to score")
    group.add_argument("--file", metavar="PATH", help="read the text from PATH (- = stdin)")
