"""PNG encoding of decoded digits: one image, or a grid of them (previews, the CLI, benchmarks)."""

from __future__ import annotations

import io

import numpy as np
import torch


def _uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 1, H, W] in [0, 1] -> [B, H, W] uint8."""
    return (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def encode(pixels: np.ndarray, scale: int = 1) -> bytes:
    from PIL import Image

    img = Image.fromarray(pixels, mode="L")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def image_png(image: torch.Tensor, scale: int = 1) -> bytes:
    """[1, H, W] in [0, 1] -> PNG bytes."""
    return encode(_uint8(image[None])[0], scale)


def grid_png(images: torch.Tensor, cols: int = 8, scale: int = 2, pad: int = 1) -> bytes:
    """[B, 1, H, W] -> one PNG of a cols-wide grid with `pad` black pixels between images."""
    px = _uint8(images)
    b, h, w = px.shape
    rows = -(-b // cols)
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            px[i]
        )
    return encode(out, scale)


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 pixels [H, W] (tests and the CLI's grid)."""
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)).convert("L"))
