"""VQ tokenizer (VQ-VAE, van den Oord et al. 1711.00937): a conv encoder to an 8x8 grid of latent
vectors, a codebook updated by exponential moving averages (the paper's appendix variant) with
dead-code restarts, and a conv decoder. 16x16 images <-> 64 token ids in [0, codebook_size)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 128  # K: the AR vocabulary's image part
    dim: int = 16  # latent vector size
    channels: int = 48  # conv width
    decay: float = 0.95  # EMA decay: small data, few steps, so a short memory
    dead_after: int = 50  # steps without use before a code restarts on a live encoder output

    def to_dict(self) -> dict:
        return asdict(self)


class VQVAE(nn.Module):
    def __init__(self, c: VQConfig) -> None:
        super().__init__()
        self.c = c
        w = c.channels
        self.encoder = nn.Sequential(  # [B, 1, 16, 16] -> [B, dim, 8, 8]
            nn.Conv2d(1, w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, w, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, c.dim, 1),
        )
        self.decoder = nn.Sequential(  # [B, dim, 8, 8] -> [B, 1, 16, 16]
            nn.Conv2d(c.dim, w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(w, w, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, 1, 3, padding=1),
        )
        # EMA state is kept as buffers so a checkpoint holds the whole tokenizer
        self.register_buffer("codebook", torch.randn(c.codebook_size, c.dim) * 0.1)  # [K, dim]
        self.register_buffer("ema_count", torch.ones(c.codebook_size))  # [K]
        self.register_buffer("ema_sum", self.codebook.clone())  # [K, dim]
        self.register_buffer("idle", torch.zeros(c.codebook_size, dtype=torch.long))  # [K]

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, dim, H, W] -> nearest code ids [B, H, W] (squared Euclidean distance)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.c.dim)  # [BHW, dim]
        d = torch.cdist(flat, self.codebook)  # [BHW, K]
        return d.argmin(-1).view(z.shape[0], z.shape[2], z.shape[3])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, H, W] -> latents [B, dim, H, W]."""
        return self.codebook[ids].permute(0, 3, 1, 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """images [B, 1, 16, 16] in [0, 1] -> token ids [B, 64] (raster order)."""
        return self.quantize(self.encoder(x * 2 - 1)).flatten(1)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """token ids [B, 64] -> images [B, 1, 16, 16] in [0, 1]."""
        side = int(ids.shape[1] ** 0.5)
        return torch.sigmoid(self.decoder(self.embed(ids.view(-1, side, side))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction logits [B, 1, 16, 16], commitment loss, ids [B, H, W]).
        The straight-through estimator passes the decoder's gradient to the encoder."""
        z = self.encoder(x * 2 - 1)
        ids = self.quantize(z)
        zq = self.embed(ids)
        if self.training:
            self._ema_update(z.detach(), ids)
        commit = F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()
        return self.decoder(zq), commit, ids

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.c.dim)  # [N, dim]
        onehot = F.one_hot(ids.flatten(), self.c.codebook_size).to(flat.dtype)  # [N, K]
        count = onehot.sum(0)  # [K]
        self.ema_count.mul_(self.c.decay).add_(count, alpha=1 - self.c.decay)
        self.ema_sum.mul_(self.c.decay).add_(onehot.t() @ flat, alpha=1 - self.c.decay)
        self.codebook.copy_(self.ema_sum / self.ema_count.clamp(min=1e-5)[:, None])
        # Dead-code restart: a code no encoder output chose for `dead_after` steps moves onto a
        # random encoder output of this batch, so the whole codebook stays in use.
        self.idle.add_(1).masked_fill_(count > 0, 0)
        dead = torch.nonzero(self.idle >= self.c.dead_after).flatten()
        if len(dead):
            pick = flat[torch.randint(len(flat), (len(dead),), device=flat.device)]
            self.codebook[dead] = pick
            self.ema_sum[dead] = pick
            self.ema_count[dead] = 1.0
            self.idle[dead] = 0


def nearest_codes(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """[K, dim] -> [K, k]: for each code the k other codes nearest to it in latent space, nearest
    first (LANTERN's latent neighbourhood, arXiv 2410.03355)."""
    d = torch.cdist(codebook.double(), codebook.double())  # [K, K]
    d.fill_diagonal_(float("inf"))
    return d.argsort(-1)[:, :k]
