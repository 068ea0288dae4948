"""Generate the Python gRPC stubs from protos/specmesh/v1 (the one command: `specmesh protos`).

Stubs are committed so that runtime installs need no protoc; `--check` regenerates into a
temporary directory and fails when the committed stubs differ (broken or stale generation).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PACKAGE = Path("specmesh") / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the generated files, relative to out_root."""
    try:
        from grpc_tools import protoc
    except ImportError as e:  # grpcio-tools is a dev/test dependency only
        raise SystemExit("grpcio-tools is not installed: pip install -e '.[test]'") from e
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    (out_root / PACKAGE).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see messages above)")
    init = out_root / PACKAGE / "__init__.py"
    init.write_text('"""Generated protobuf/gRPC stubs for specmesh.v1 (do not edit; `specmesh protos`)."""\n')
    return sorted(p.relative_to(out_root) for p in (out_root / PACKAGE).iterdir() if p.is_file())


def stale_files() -> list[str]:
    """Names of generated files that differ from (or are missing in / extra to) the committed stubs."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = set(generate(Path(tmp)))
        committed = {p.relative_to(REPO_ROOT) for p in (REPO_ROOT / PACKAGE).glob("*.py*")}
        stale = sorted(str(p) for p in fresh ^ committed)
        for rel in sorted(fresh & committed):
            if not filecmp.cmp(Path(tmp) / rel, REPO_ROOT / rel, shallow=False):
                stale.append(str(rel))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specmesh protos", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated stubs (run `specmesh protos`):\n  " + "\n  ".join(stale), file=sys.stderr)
            return 1
        print("generated stubs are up to date")
        return 0
    for rel in generate(REPO_ROOT):
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
