"""The handwritten digits that ship inside scikit-learn (`load_digits`: 1,797 8x8 images, 16 grey
levels), upsampled to 16x16, with fixed seeded splits and a manifest.

16x16, not 32x32: the source holds 8x8 pixels, so 16x16 keeps all of its information while a
stride-2 VQ encoder still gives an 8x8 token grid (64 tokens per image, long enough for
speculative decoding to matter); the convolutions then cost a quarter of what 32x32 would,
which keeps the whole recipe within minutes on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 16  # image side after upsampling
NUM_CLASSES = 10
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Digits:
    images: torch.Tensor  # [N, 1, SIZE, SIZE] float32 in [0, 1]
    labels: torch.Tensor  # [N] int64
    splits: dict[str, np.ndarray]  # split name -> indices into images (sorted)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.splits[name])
        return self.images[idx], self.labels[idx]


def upsample(images8: np.ndarray) -> torch.Tensor:
    """[N, 8, 8] grey levels 0..16 -> [N, 1, 16, 16] in [0, 1] (bilinear, corners aligned so the
    border pixels keep their value)."""
    x = torch.from_numpy(images8.astype(np.float32) / 16.0)[:, None]
    return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=True).clamp(0, 1)


def stratified_splits(labels: np.ndarray, seed: int, fractions=(0.8, 0.1, 0.1)) -> dict[str, np.ndarray]:
    """Per class, a seeded permutation cut by `fractions`, so every split has every class in
    proportion."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = round(fractions[0] * len(idx))
        n_val = round(fractions[1] * len(idx))
        out["train"] += idx[:n_train].tolist()
        out["val"] += idx[n_train : n_train + n_val].tolist()
        out["test"] += idx[n_train + n_val :].tolist()
    return {s: np.sort(np.array(v, dtype=np.int64)) for s, v in out.items()}


def load(seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits  # lazy: only training and the benchmark need it

    d = load_digits()
    labels = d.target.astype(np.int64)
    return Digits(upsample(d.images), torch.from_numpy(labels), stratified_splits(labels, seed))


def manifest(digits: Digits, seed: int) -> dict:
    """What a run trained on: per split its size, per-class counts and the sha256 of its indices."""
    out: dict = {"source": "sklearn.datasets.load_digits", "image_size": SIZE, "split_seed": seed}
    for name, idx in digits.splits.items():
        counts = np.bincount(digits.labels.numpy()[idx], minlength=NUM_CLASSES)
        out[name] = {
            "count": len(idx),
            "per_class": counts.tolist(),
            "indices_sha256": hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest(),
        }
    return out


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light augmentation: a shift of up to one pixel each way and a contrast scale in
    [0.85, 1.1]. [B, 1, S, S] -> same shape. Digits keep their class under both."""
    B = images.shape[0]
    shifts = torch.randint(-1, 2, (B, 2), generator=generator)
    padded = F.pad(images, (1, 1, 1, 1))
    out = torch.stack(
        [
            padded[b, :, 1 + dy : 1 + dy + SIZE, 1 + dx : 1 + dx + SIZE]
            for b, (dy, dx) in enumerate(shifts.tolist())
        ]
    )
    scale = 0.85 + 0.25 * torch.rand(B, 1, 1, 1, generator=generator)
    return (out * scale).clamp(0, 1)
