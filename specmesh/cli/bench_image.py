"""`specmesh bench image`: the image decoding methods against plain AR, speed and quality."""

from __future__ import annotations

import argparse


def add_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "image",
        help="image decoding: ar, exact_sd, lantern, gsd (images/s, speed-up, accuracy, Frechet distance)",
        description="Generates --n images per method (classes 0..9 in turn) with the image models of "
        "`specmesh train image`, batches rotating through the methods so load changes hit all alike. "
        "Reports images/s, speedup_vs_ar (same run), mean_accepted_len (codes per target forward, "
        "counting the bonus), class_accuracy (the judge's, with a 95% interval) and "
        "frechet_distance (judge features, against the real test digits), then LANTERN's trade-off "
        "over delta. Writes JSON, a PNG grid per method and a PNG of the trade-off.",
        epilog="Example: specmesh bench image --n 256 --out image.json",
    )
    p.add_argument("--n", type=int, default=256, help="images per method (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="images per decode call (default: %(default)s)")
    p.add_argument(
        "--sweep-n", type=int, default=128, help="images per delta in the sweep (default: %(default)s)"
    )
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale (default: %(default)s)")
    p.add_argument(
        "--delta", type=float, default=0.2, help="LANTERN's delta in the method table (default: %(default)s)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--model-dir", default=None, help="image model directory (default: <model root>/digits-image)"
    )
    p.add_argument("--out", required=True, help="JSON output; PNGs go next to it")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bench.image.run import ImageBenchConfig, summary
    from bench.image.run import run as run_bench

    cfg = ImageBenchConfig(
        n=args.n,
        batch=args.batch,
        sweep_n=args.sweep_n,
        cfg_scale=args.cfg,
        lantern_delta=args.delta,
        threads=args.threads,
        seed=args.seed,
        model_dir=args.model_dir,
        out=args.out,
        progress=not args.no_progress,
    )
    print(summary(run_bench(cfg)))
    return 0
