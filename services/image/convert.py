"""ImageGenerateRequest -> the decoding configuration, with every check that can refuse it."""

from __future__ import annotations

import math
import secrets

import torch

from services.core.errors import InvalidArgument
from services.core.image_decoding import ImageDecodeConfig, Method
from services.core.image_spec import GroupRule
from services.core.params import SamplingConfig
from services.image.layout import Layout
from specmesh.v1 import image_pb2

MAX_IMAGES = 64  # per request: the KV pool and one response stream's size
DEFAULT_CFG_SCALE = 4.0  # measured on the default models: class accuracy 0.65 at 2, 0.9 at 4 (60 images)
DEFAULT_LANTERN_K = 8
DEFAULT_GSD_GROUP = 5
DRAFT_LEN = 4  # drafted tokens per round (exact SD, LANTERN) and Jacobi window (GSD)

POLICIES = {
    image_pb2.IMAGE_POLICY_UNSPECIFIED: Method.AR,
    image_pb2.IMAGE_POLICY_TARGET: Method.AR,
    image_pb2.IMAGE_POLICY_SPECULATIVE: Method.EXACT_SD,
    image_pb2.IMAGE_POLICY_LANTERN: Method.LANTERN,
    image_pb2.IMAGE_POLICY_GSD: Method.GSD,
}
METHOD_POLICY = {m: p for p, m in POLICIES.items() if p != image_pb2.IMAGE_POLICY_UNSPECIFIED}


def sampling(request: image_pb2.ImageGenerateRequest, codebook_size: int) -> tuple[SamplingConfig, int]:
    """(sampling config, seed). No sampling message: temperature 1 and a fresh seed."""
    if not request.HasField("sampling"):
        return SamplingConfig(temperature=1.0), secrets.randbits(63)
    s = request.sampling
    cfg = SamplingConfig(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    cfg.validate(codebook_size)
    return cfg, s.seed if s.HasField("seed") else secrets.randbits(63)


def decode_config(
    request: image_pb2.ImageGenerateRequest,
    layout: Layout,
    neighbours: torch.Tensor,
    cos_dist: torch.Tensor,
) -> tuple[ImageDecodeConfig, list[int]]:
    """(config, class token per image). neighbours [K, k_max], cos_dist [K, K]: the codebook's
    latent geometry the relaxed rules group by."""
    classes = _class_tokens(request, layout)
    if request.policy not in POLICIES:
        names = ", ".join(image_pb2.ImagePolicy.Name(p) for p in POLICIES)
        raise InvalidArgument(f"unknown policy {request.policy}; known: {names}", "policy")
    method = POLICIES[request.policy]
    if not 0.0 <= request.lantern_delta <= 1.0:  # also NaN
        raise InvalidArgument(f"must be in [0, 1], got {request.lantern_delta}", "lantern_delta")
    if not 0 <= request.lantern_k <= neighbours.shape[1]:
        raise InvalidArgument(f"must be in [0, {neighbours.shape[1]}], got {request.lantern_k}", "lantern_k")
    if not 0 <= request.gsd_group_size <= layout.codebook_size:
        raise InvalidArgument(
            f"must be in [0, {layout.codebook_size}], got {request.gsd_group_size}", "gsd_group_size"
        )
    if not (request.cfg_scale == 0.0 or 1.0 <= request.cfg_scale <= 20.0) or math.isnan(request.cfg_scale):
        raise InvalidArgument(f"must be 0 (default) or in [1, 20], got {request.cfg_scale}", "cfg_scale")
    if request.preview_every < 0:
        raise InvalidArgument(f"must be >= 0, got {request.preview_every}", "preview_every")
    cfg_sampling, seed = sampling(request, layout.codebook_size)
    if method is Method.LANTERN:
        k = request.lantern_k or DEFAULT_LANTERN_K
        rule = GroupRule("lantern", neighbours=neighbours[:, :k], delta=request.lantern_delta)
    elif method is Method.GSD:
        rule = GroupRule("gsd", cos_dist=cos_dist, size=request.gsd_group_size or DEFAULT_GSD_GROUP)
    else:
        rule = GroupRule("exact")
    cfg = ImageDecodeConfig(
        codebook_size=layout.codebook_size,
        tokens_per_image=layout.tokens_per_image,
        null_class=layout.null_class,
        method=method,
        sampling=cfg_sampling,
        cfg_scale=request.cfg_scale or DEFAULT_CFG_SCALE,
        seed=seed,
        draft_len=DRAFT_LEN,
        rule=rule,
    )
    return cfg, classes


def _class_tokens(request: image_pb2.ImageGenerateRequest, layout: Layout) -> list[int]:
    """One class token per image: class_labels when given, else num_images of class_label."""
    if request.class_labels:
        n = len(request.class_labels)
        if n > MAX_IMAGES:
            raise InvalidArgument(f"at most {MAX_IMAGES} images per request, got {n}", "class_labels")
        if request.num_images not in (0, n):
            raise InvalidArgument(
                f"is {request.num_images} but class_labels has {n} entries (use 0 or {n})", "num_images"
            )
        return [layout.class_token(c, "class_labels") for c in request.class_labels]
    token = layout.class_token(request.class_label, "class_label")
    if not 1 <= request.num_images <= MAX_IMAGES:
        raise InvalidArgument(f"must be in [1, {MAX_IMAGES}], got {request.num_images}", "num_images")
    return [token] * request.num_images
