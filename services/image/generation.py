"""In-process image generation: the decoding loop to the end, then the VQ decoder. Shared by the
CLI's local mode and the benchmark (the service streams the same loop step by step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.core.engine import Engine
from services.core.image_decoding import ImageDecodeConfig, decode
from services.image.store import ImageModels


@dataclass
class Generated:
    codes: torch.Tensor  # [n, 64] code ids
    images: torch.Tensor  # [n, 1, 16, 16] in [0, 1]
    stats: dict[str, float]  # DecodeState.stats()


def generate(
    models: ImageModels, target: Engine, draft: Engine | None, classes: list[int], cfg: ImageDecodeConfig
) -> Generated:
    """classes: class tokens, one per image (see Layout.class_token)."""
    *_, state = decode(target, draft, classes, cfg)  # run to the end (the last state is done)
    codes = torch.tensor([lane.codes for lane in state.lanes])
    with torch.no_grad():
        images = models.vq.decode(codes)
    return Generated(codes, images, state.stats())
