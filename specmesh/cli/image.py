"""`specmesh image generate`: class-conditional digits from the image models, as one PNG grid.

Runs in-process on the trained models (`specmesh train image`) or, with --address, through a
running image service (`specmesh serve image`), streaming its previews. Prints images/s and, for
the speculative methods, the mean accepted length (tokens per target forward, counting the
bonus token) and the acceptance rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ENV_ADDRESS = "SPECMESH_IMAGE_ADDRESS"
METHODS = ("ar", "exact_sd", "lantern", "gsd")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("image", help="generate digit images (class-conditional AR over VQ tokens)")
    isub = p.add_subparsers(dest="image_command", metavar="WHAT", required=True)
    g = isub.add_parser("generate", help="generate a grid of digits of one class", description=__doc__)
    g.add_argument("--class", dest="class_label", type=int, required=True, help="digit class 0..9")
    g.add_argument("--n", type=int, default=16, help="images (default: %(default)s, at most 64)")
    g.add_argument(
        "--method",
        choices=METHODS,
        default="ar",
        help="ar (plain), exact_sd (lossless speculative), lantern (relaxed over latent neighbours), "
        "gsd (grouped acceptance on speculative Jacobi decoding); default: %(default)s",
    )
    g.add_argument(
        "--delta", type=float, default=0.2, help="LANTERN's TV budget in [0, 1] (default: %(default)s)"
    )
    g.add_argument("--k", type=int, default=0, help="LANTERN's latent neighbours (0 = the server's default)")
    g.add_argument("--group-size", type=int, default=0, help="GSD's group size (0 = the server's default)")
    g.add_argument(
        "--cfg", type=float, default=0.0, help="classifier-free guidance scale (0 = default, 1 = off)"
    )
    g.add_argument("--temperature", type=float, default=1.0, help="default: %(default)s (0 = greedy)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling over the codes (0 = off)")
    g.add_argument("--seed", type=int, default=None, help="seed (default: fresh); a seed fixes the images")
    g.add_argument("--out", default="grid.png", help="output PNG (default: %(default)s)")
    g.add_argument(
        "--model-dir", default=None, help="image model directory (default: <model root>/digits-image)"
    )
    g.add_argument(
        "--address",
        default=os.environ.get(ENV_ADDRESS),
        metavar="ADDR",
        help=f"image service host:port; unset = run in-process [{ENV_ADDRESS}]",
    )
    g.set_defaults(func=run_generate)


def build_request(args: argparse.Namespace):
    from services.core.image_decoding import Method
    from services.image.convert import METHOD_POLICY
    from specmesh.v1 import common_pb2, image_pb2

    sampling = common_pb2.SamplingParams(temperature=args.temperature, top_k=args.top_k)
    if args.seed is not None:
        sampling.seed = args.seed
    return image_pb2.ImageGenerateRequest(
        class_label=args.class_label,
        num_images=args.n,
        sampling=sampling,
        policy=METHOD_POLICY[Method(args.method)],
        lantern_delta=args.delta if args.method == "lantern" else 0.0,
        lantern_k=args.k,
        gsd_group_size=args.group_size,
        cfg_scale=args.cfg,
    )


def _local(request, model_dir):
    """(images [n, 1, 16, 16], mean accepted length, acceptance rate, seconds), in-process; the
    seconds count generation only, not loading the models."""

    from services.core.engine import Engine
    from services.core.image_spec import cosine_distances
    from services.image.convert import decode_config
    from services.image.generation import generate
    from services.image.servicer import MAX_NEIGHBOURS
    from services.image.store import load_image_models
    from services.image.vq import nearest_codes

    models = load_image_models(model_dir)
    codebook = models.vq.codebook
    neighbours = nearest_codes(codebook, min(MAX_NEIGHBOURS, len(codebook) - 1))
    cfg, classes = decode_config(request, models.layout, neighbours, cosine_distances(codebook))
    target = Engine.from_dir(models.target_dir)
    draft = Engine.from_dir(models.draft_dir)
    start = time.perf_counter()
    out = generate(models, target, draft, classes, cfg)
    seconds = time.perf_counter() - start
    return out.images, out.stats["mean_accepted_length"], out.stats["acceptance_rate"], seconds


def _remote(request, address):
    import grpc
    import numpy as np
    import torch
    from tqdm import tqdm

    from services.image import png
    from specmesh.v1 import image_pb2_grpc

    request.preview_every = 8
    images: dict[int, torch.Tensor] = {}
    taus, rates = [], []
    with grpc.insecure_channel(address) as channel:
        stub = image_pb2_grpc.ImageServiceStub(channel)
        with tqdm(total=request.num_images, unit="img", desc="image", dynamic_ncols=True) as bar:
            for chunk in stub.Generate(request):
                if chunk.final:
                    px = png.decode_png(chunk.png).astype(np.float32) / 255
                    images[chunk.image_index] = torch.from_numpy(px)[None]
                    taus.append(chunk.spec_stats.mean_accepted_length)
                    rates.append(chunk.spec_stats.acceptance_rate)
                    bar.update()
    stacked = torch.stack([images[i] for i in sorted(images)])
    return stacked, sum(taus) / len(taus), sum(rates) / len(rates)


def run_generate(args: argparse.Namespace) -> int:
    from services.image import png

    request = build_request(args)
    if args.address:
        start = time.perf_counter()
        images, tau, rate = _remote(request, args.address)
        seconds = time.perf_counter() - start
    else:
        images, tau, rate, seconds = _local(request, args.model_dir)
    with open(args.out, "wb") as f:
        f.write(png.grid_png(images, cols=min(8, len(images)), scale=4))
    line = f"{len(images)} images of class {args.class_label} ({args.method}) -> {args.out}: "
    line += f"{len(images) / seconds:.2f} images/s"
    if args.method != "ar":
        line += f", mean accepted length {tau:.2f}, acceptance {rate:.2f}"
    print(line, file=sys.stderr)
    return 0
