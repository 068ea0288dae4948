"""`specmesh train image`: the VQ tokenizer, the judge, the class-conditional AR model and its draft."""

from __future__ import annotations

import argparse
import sys


def add_parser(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser(
        "image",
        help="train the image models (VQ tokenizer, AR model, its draft, the judge) on sklearn's digits",
        description="Trains, on the handwritten digits inside scikit-learn (upsampled to 16x16, seeded "
        "splits): a VQ tokenizer (8x8 token grid, EMA codebook with dead-code restarts), a judge "
        "classifier, a class-conditional AR model over the token grid with class dropout for "
        "classifier-free guidance, and a small draft AR model; the last two on the serving engine's "
        "Llama architecture. On CPU 20 minutes on a busy 2-core machine, less on a quiet one (one "
        "thread is fastest on a loaded machine); "
        "CUDA takes larger batches and more steps. Writes safetensors, image.json, "
        "train_report.json (reconstruction error, codebook usage, accuracy, NLL, data manifest) and "
        "manifest.json (sha256 of every file).",
    )
    p.add_argument("--out", default=None, help="output directory (default: <model root>/digits-image)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: %(default)s)")
    for name in ("vq_steps", "ar_steps", "draft_steps", "judge_steps", "batch", "seed"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing when the output directory already holds complete image models (every "
        "file its manifests list, at the recorded size): the idempotent init job of compose and Helm",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.image.store import default_dir, is_complete

    out = Path(args.out) if args.out else default_dir()
    if args.if_missing:
        if is_complete(out):
            print(f"image models already complete: {out} (--if-missing: not trained again)")
            return 0
        if out.exists():
            print(f"{out} is incomplete: training the image models again", file=sys.stderr)

    import torch

    from services.draft.training.device import pick_device
    from services.image.training.recipe import ImageRecipe
    from services.image.training.train import train_image

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    names = ("vq_steps", "ar_steps", "draft_steps", "judge_steps", "batch", "seed", "lr")
    recipe = ImageRecipe.for_device(dev, **{k: getattr(args, k) for k in names})
    train_image(out, recipe, device=str(dev), progress=not args.no_progress)
    print(f"image models ready: {out}")
    return 0
