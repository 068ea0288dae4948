"""The quality judge: a small CNN classifier trained on the real digits (train split; its
accuracy is measured on the held-out test split). It gives the class accuracy of generated
images and the features (the penultimate layer) a Frechet distance is computed in."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Judge(nn.Module):
    FEATURES = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(  # [B, 1, 16, 16] -> [B, FEATURES]
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.FEATURES),
            nn.SiLU(),
        )
        self.head = nn.Linear(self.FEATURES, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def features_and_labels(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """images [B, 1, 16, 16] -> (features [B, FEATURES] float64, predicted classes [B])."""
        f = self.body(x)
        return f.double().numpy(), self.head(f).argmax(-1).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [n, d] and b [m, d]
    (Heusel et al. 1706.08500): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with the
    matrix square root from scipy.linalg.sqrtm."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    if np.iscomplexobj(covmean):  # numerical noise of a nearly singular product
        covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))
