"""`specmesh train draft`: train (or just slice) a speculative-decoding draft for a target model."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train models the system serves (draft for speculative decoding, image models)"
    )
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
    d.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="PACK",
        help="train on a data pack from `specmesh train pack` (corpus + chat prompts) instead of this "
        "machine's stdlib/man/doc files; repeatable",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=run)

    k = tsub.add_parser(
        "pack",
        help="gather draft-training data (tokenized corpus + chat prompts) into one portable file",
        description="Reads the same real offline text `train draft` uses (CPython stdlib, man pages, "
        "docs; benchmark sources and reserved evaluation texts held out), tokenizes it with the "
        "target's tokenizer and writes one compressed .npz with the chat prompts, so a machine "
        "without those files (a bare GPU image) can train with `train draft --data FILE`.",
    )
    k.add_argument("--target", default="smollm2-135m-instruct", help="target model name or directory")
    k.add_argument("--out", required=True, help="output file (.npz)")
    k.add_argument(
        "--tokens", type=int, default=8_000_000, help="corpus tokens to pack (default %(default)s)"
    )
    k.add_argument(
        "--doc-max-tokens", type=int, default=8192, help="tokens kept per document, a random window"
    )
    k.add_argument("--templated-prompts", type=int, default=6000, help="man/stdlib prompts to template")
    k.add_argument("--skip", type=int, default=0, help="skip this many corpus documents first (a 2nd pack)")
    k.add_argument("--seed", type=int, default=0)
    k.set_defaults(func=run_pack)

    _add_router_parser(tsub)
    _add_detector_parser(tsub)
    _add_membership_parser(tsub)

    from specmesh.cli import train_image

    train_image.add_parser(tsub)


def _add_detector_parser(tsub: argparse._SubParsersAction) -> None:
    t = tsub.add_parser(
        "detector",
        help="train the learned machine-text detector the scoring service serves (DETECT_METHOD_PAWN)",
        description="Builds the data set when missing: prose paragraphs of /usr/share/doc (human) and "
        "the scored model's sampled continuations of their first 16 tokens, cut to the same length "
        "(machine), split by package into train/val/test, plus the test paragraphs continued by "
        "--unseen-generator; a manifest records each file's sha256. Then scores every text with the "
        "model as the service does, trains a PAWN-style network (arXiv 2501.03940: per-token "
        "statistics and hidden states, a learned gate over the tokens), reports AUROC and TPR at 1%% "
        "FPR per split beside log-likelihood and Fast-DetectGPT, and writes detector.onnx, "
        "detector.safetensors and detector.json to --out, by default <model dir>/detector/, where "
        "`specmesh serve scoring` looks.",
    )
    t.add_argument("--model", default="smollm2-135m-instruct", help="scored model (default: %(default)s)")
    t.add_argument("--out", type=Path, help="detector directory (default: <model dir>/detector)")
    t.add_argument("--data", type=Path, help="data set directory (default: beside the model store)")
    t.add_argument("--rebuild-data", action="store_true", help="rebuild the data set even if it is complete")
    t.add_argument("--paragraphs", type=int, help="use at most N paragraphs, evenly spaced (default: all)")
    t.add_argument(
        "--unseen-generator",
        default="smollm2-135m-instruct-draft",
        help="second generator for the test_unseen split, 'none' to skip (default: %(default)s)",
    )
    t.add_argument("--epochs", type=int, default=40, help="training epochs (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=run_detector)


def run_detector(args: argparse.Namespace) -> int:
    import json

    from services.scoring.detector import CONFIG_FILE
    from services.scoring.training.detector_train import TrainConfig, train_detector

    unseen = None if args.unseen_generator.lower() == "none" else args.unseen_generator
    out = train_detector(
        args.model,
        out=args.out,
        data_dir=args.data,
        rebuild_data=args.rebuild_data,
        max_paragraphs=args.paragraphs,
        unseen_generator=unseen,
        cfg=TrainConfig(epochs=args.epochs, seed=args.seed),
        progress=not args.no_progress,
    )
    report = json.loads((out / CONFIG_FILE).read_text())["report"]
    print(f"detector ready: {out}")
    print(f"  {'split':<12} {'texts':>5}  {'AUROC learned / log-lik / Fast-DetectGPT':<42} TPR@1%FPR learned")
    for name, r in report.items():
        aurocs = " / ".join(f"{r[k]['auroc']:.3f}" for k in ("learned", "log_likelihood", "fast_detectgpt"))
        print(f"  {name:<12} {r['texts']:>5}  {aurocs:<42} {r['learned']['tpr_at_1pct_fpr']:.3f}")
    return 0


def _add_membership_parser(tsub: argparse._SubParsersAction) -> None:
    m = tsub.add_parser(
        "membership",
        help="fine-tune a draft on a known member set, for measuring membership inference",
        description="Takes prose paragraphs of /usr/share/doc (the detector's human texts), cut to "
        "--max-tokens tokens, and sends each document's paragraphs to the member or the non-member "
        "side by a seeded hash of its path; fine-tunes --base on the --texts members for --epochs "
        "(next-token cross-entropy, every weight) and writes a model directory with members.jsonl, "
        "nonmembers.jsonl and train_report.json (losses on both sides before and after). "
        "`specmesh bench membership --model DIR` then measures Min-K%%, Min-K%%++ and DC-PDD on it.",
        epilog="Example: specmesh train membership --texts 200 --epochs 3",
    )
    m.add_argument(
        "--base", default="smollm2-135m-instruct-draft", help="model to fine-tune (default: %(default)s)"
    )
    m.add_argument("--out", type=Path, help="output directory (default: <model store>/<base>-members)")
    m.add_argument("--texts", type=int, default=200, help="members, and as many non-members (default: 200)")
    m.add_argument("--epochs", type=int, help="passes over the members (default 3)")
    m.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    m.add_argument("--max-tokens", type=int, help="tokens per text (default 128)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=run_membership)


def run_membership(args: argparse.Namespace) -> int:
    from services.core.model_store import resolve_model
    from services.core.tokenizer import Tokenizer
    from services.draft.training.membership import (
        MembershipRecipe,
        cut_text,
        split_members,
        train_membership_model,
    )
    from services.scoring.convert import start_token_id
    from services.scoring.training.detector_data import human_paragraphs

    if args.texts < 2:
        raise SystemExit("specmesh train membership: --texts must be at least 2")
    base = resolve_model(args.base)
    tokenizer = Tokenizer.from_dir(base)
    given = {"epochs": args.epochs, "lr": args.lr, "max_tokens": args.max_tokens, "seed": args.seed}
    recipe = MembershipRecipe(**{k: v for k, v in given.items() if v is not None})
    paragraphs = [(p.document, cut_text(tokenizer, p.text, recipe.max_tokens)) for p in human_paragraphs()]
    members, nonmembers = split_members(paragraphs, args.texts, seed=args.seed)
    if len(members) < args.texts or len(nonmembers) < args.texts:
        print(f"only {len(members)} members and {len(nonmembers)} non-members on this machine")
    out = args.out or base.parent / f"{base.name}-members"
    train_membership_model(
        base, members, nonmembers, out, start_token_id(tokenizer), recipe, progress=not args.no_progress
    )
    print(f"membership model ready: {out}\n  measure it: specmesh bench membership --model {out}")
    return 0


def _add_router_parser(tsub: argparse._SubParsersAction) -> None:
    r = tsub.add_parser(
        "router",
        help="train the R2R token router of a draft (which drafted tokens go to the target)",
        description="Labels real text with the target and the draft as the draft service serves it "
        "(truncated vocabulary, int8): where their greedy tokens differ, the target continues "
        "greedily for --window tokens after the draft's token and after its own; the token is "
        "'neutral' when the first continuation rejoins the second, else 'divergent'. Text: the "
        "target's greedy answers to --prompts real chat prompts and one window from each of "
        "--documents corpus files (CPython stdlib, man pages, /usr/share/doc), a quarter of each "
        "held out. Then trains the router MLP (services.core.routing) on the draft's hidden state, "
        "token embedding and top-k log-probabilities, and picks the threshold on the held-out "
        "texts for --recall of divergent tokens. Writes router.onnx, router.safetensors and "
        "router.json (threshold, draft digest, report) to --out, by default <draft dir>/router/, "
        "where the draft service looks. The defaults take about 4 minutes on 2 CPU cores.",
    )
    r.add_argument("--draft", default="smollm2-135m-instruct-draft", help="draft model name or directory")
    r.add_argument("--target", help="target model name or directory (default: the draft's draft_of)")
    r.add_argument("--prompts", type=int, help="chat prompts the target answers (default 96)")
    r.add_argument("--documents", type=int, help="corpus documents, one window each (default 48)")
    r.add_argument("--window", type=int, help="continuation tokens compared after a mismatch (default 5)")
    r.add_argument(
        "--recall", type=float, help="held-out recall of divergent tokens the threshold keeps (default 0.9)"
    )
    r.add_argument("--epochs", type=int, help="training epochs over the labelled positions (default 4)")
    r.add_argument("--out", help="router directory (default: <draft dir>/router)")
    r.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's or 1, whichever a short probe finds faster: "
        "on a 2-core machine where another process keeps a core busy, 2 threads stall)",
    )
    r.add_argument(
        "--no-int8",
        dest="int8",
        action="store_false",
        default=None,
        help="draft features in fp32, for a draft served with `serve draft --no-int8`",
    )
    r.add_argument("--seed", type=int)
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(func=run_router)


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

    from services.draft.training.checkpoint import REPORT_FILE
    from services.draft.training.device import pick_device
    from services.draft.training.recipe import DraftRecipe
    from services.draft.training.train import train_draft

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
        args.target,
        name,
        minutes=minutes,
        device=str(dev),
        recipe=recipe,
        progress=not args.no_progress,
        data_packs=args.data,
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


def run_pack(args: argparse.Namespace) -> int:
    import itertools
    import os

    from tqdm import tqdm

    from services.core.model_store import resolve_model
    from services.core.tokenizer import Tokenizer
    from services.draft.training import data
    from services.draft.training.pack import build_pack, tokenizer_sha256

    target_dir = resolve_model(args.target)
    tok = Tokenizer.from_dir(target_dir)
    prompts = data.chat_prompts(seed=args.seed, max_templated=args.templated_prompts)
    docs = itertools.islice(data.corpus_documents(seed=args.seed), args.skip, None)
    with tqdm(total=args.tokens, unit="tok", desc="pack", dynamic_ncols=True) as bar:
        meta = build_pack(
            args.out,
            docs,
            tok.encode,
            prompts,
            tokenizer_sha=tokenizer_sha256(target_dir),
            max_tokens=args.tokens,
            doc_max_tokens=args.doc_max_tokens,
            seed=args.seed,
            progress=bar.update,
        )
    size = os.path.getsize(args.out) / 2**20
    print(
        f"{args.out}: {meta['tokens']} tokens in {meta['documents']} documents, "
        f"{meta['prompts']} prompts, {size:.1f} MiB"
    )
    return 0


def run_router(args: argparse.Namespace) -> int:
    import json

    from services.draft.router import CONFIG_FILE
    from services.draft.training.router import RouterRecipe, train_router

    flags = ("prompts", "documents", "window", "recall", "epochs", "int8", "seed")
    recipe = RouterRecipe(**{k: getattr(args, k) for k in flags if getattr(args, k) is not None})
    out = train_router(
        args.draft,
        args.target,
        recipe=recipe,
        out=args.out,
        progress=not args.no_progress,
        threads=args.threads,
    )
    config = json.loads((out / CONFIG_FILE).read_text())
    held = config["report"]["held_out"]["all"]
    labels = config["report"]["labels"]["all"]
    print(
        f"router ready: {out}\n  threshold {config['threshold']:.4f} (held-out recall {held['recall']} of "
        f"divergent tokens, precision {held['precision']}, AUC {held['auc']}, flags {held['flagged_share']} "
        f"of tokens)\n  labels: {labels['match']} match, {labels['neutral']} neutral, {labels['divergent']} "
        f"divergent (mismatch rate {labels['mismatch_rate']}, neutral share {labels['neutral_share']})"
    )
    return 0
