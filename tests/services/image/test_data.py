"""The digits data: fixed stratified splits, a manifest that identifies them, augmentation that
keeps shape and range, and the VQ tokenizer's shapes and dead-code restarts."""

from __future__ import annotations

import numpy as np
import torch

from services.image import data
from services.image.vq import VQVAE, VQConfig, nearest_codes


def test_splits_are_disjoint_stratified_and_fixed_by_the_seed() -> None:
    d = data.load(seed=0)
    assert d.images.shape == (1797, 1, 16, 16) and 0 <= float(d.images.min()) <= float(d.images.max()) <= 1
    idx = [set(d.splits[s].tolist()) for s in data.SPLITS]
    assert sum(len(i) for i in idx) == 1797 and not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2])
    m = data.manifest(d, 0)
    assert all(min(m[s]["per_class"]) >= 17 for s in data.SPLITS)
    assert data.manifest(data.load(seed=0), 0) == m
    assert data.manifest(data.load(seed=1), 1)["test"]["indices_sha256"] != m["test"]["indices_sha256"]


def test_upsampling_keeps_the_source_pixels_at_the_corners() -> None:
    img = np.arange(64, dtype=np.float64).reshape(1, 8, 8) % 17
    up = data.upsample(img)
    assert torch.allclose(up[0, 0, ::15, ::15], torch.tensor(img[0, ::7, ::7] / 16, dtype=torch.float32))


def test_augmentation_keeps_shape_and_range_and_changes_images() -> None:
    x, _ = data.load().split("val")
    out = data.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.equal(out, x)


def test_vq_round_trip_shapes_and_dead_code_restart() -> None:
    torch.manual_seed(0)
    vq = VQVAE(VQConfig(codebook_size=16, dim=4, channels=8, dead_after=2))
    x = torch.rand(5, 1, 16, 16)
    ids = vq.encode(x)
    assert ids.shape == (5, 64) and int(ids.max()) < 16
    assert vq.decode(ids).shape == (5, 1, 16, 16)
    vq.codebook[3] = 1e6  # a code nothing will choose
    vq.train()
    for _ in range(3):
        vq(x)
    assert float(vq.codebook[3].abs().max()) < 1e3  # restarted onto an encoder output
    nb = nearest_codes(vq.codebook, 4)
    assert nb.shape == (16, 4) and not (nb == torch.arange(16)[:, None]).any()
