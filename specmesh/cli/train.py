"""`specmesh train draft`: train (or just slice) a speculative-decoding draft for a target model."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train models the system serves (draft for speculative decoding)")
    tsub = p.add_subparsers(dest="train_command", metavar="WHAT", required=True)
    d = tsub.add_parser(
        "draft",
        help="distil a small draft model from a target model into the model directory",
        description="Slices the target's first --layers layers (shared embedding and tied head), then "
        "distils them on target-labelled tokens: the target's own answers to real chat prompts, and "
        "the target's top-k logits over a real offline corpus (CPython stdlib, man pages, docs). "
        "Uses CUDA when available (bf16, large batches), else a CPU run bounded by --minutes. "
        "Writes a standard HF Llama directory (config.json, model.safetensors, tokenizer files, "
        "draft_vocab.json, train_report.json, manifest.json). --minutes 0 / --untrained only slices "
        "(seconds).",
    )
    d.add_argument("--target", default="smollm2-135m-instruct", help="target model name or directory")
    d.add_argument("--name", help="output model name in the store (default: <target>-draft)")
    d.add_argument("--minutes", type=float, default=25.0, help="time budget for labelling + training")
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    d.add_argument("--layers", type=int, help="draft depth (target layers sliced; default 4)")
    d.add_argument("--untrained", action="store_true", help="only slice and save (same as --minutes 0)")
    d.add_argument(
        "--draft-vocab", type=int, help="truncated draft vocabulary size, 0 = full (default 16384)"
    )
    d.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    d.add_argument("--lr", type=float, help="peak learning rate")
    d.add_argument("--seq-len", type=int, help="corpus chunk length")
    d.add_argument("--batch", type=int, dest="corpus_batch", help="corpus chunks per step")
    d.add_argument("--chat-batch", type=int, help="chat answers per step")
    d.add_argument("--gen-batch", type=int, help="prompts the target answers together")
    d.add_argument("--max-new-tokens", type=int, help="length cap of each generated answer")
    d.add_argument("--gen-frac", type=float, help="share of the budget spent generating chat answers")
    d.add_argument("--chat-frac", type=float, help="share of training steps on chat answers")
    d.add_argument("--n-eval", type=int, help="held-out chat prompts for the agreement estimate")
    d.add_argument("--eval-every", type=float, dest="eval_every_s", help="seconds between evaluations")
    d.add_argument(
        "--train-embeddings", action="store_true", default=None, help="also train the tied embedding"
    )
    d.add_argument("--seed", type=int)
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=run)


_RECIPE_FLAGS = (
    "lr",
    "seq_len",
    "corpus_batch",
    "chat_batch",
    "gen_batch",
    "max_new_tokens",
    "gen_frac",
    "chat_frac",
    "n_eval",
    "eval_every_s",
    "train_embeddings",
    "seed",
)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from services.core.training.draft import REPORT_FILE, DraftRecipe, pick_device, train_draft

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    overrides = {k: getattr(args, k) for k in _RECIPE_FLAGS}
    overrides["num_layers"] = args.layers
    overrides["draft_vocab_size"] = args.draft_vocab
    recipe = DraftRecipe.for_device(dev, **overrides)
    name = args.name or f"{args.target.rstrip('/').split('/')[-1]}-draft"
    minutes = 0.0 if args.untrained else args.minutes
    out = train_draft(
        args.target, name, minutes=minutes, device=str(dev), recipe=recipe, progress=not args.no_progress
    )
    report = json.loads((out / REPORT_FILE).read_text())
    if report.get("trained"):
        final = report["eval"]["final"]
        print(
            f"draft ready: {out}\n  alpha (greedy agreement, held-out chat answers): {final['alpha']:.3f} "
            f"over {final['eval_tokens']} tokens; tokens seen: {report['tokens_seen']}; "
            f"{report['minutes']:.1f} min"
        )
    else:
        print(f"draft ready (untrained slice): {out}")
    return 0
