"""Sizes and step counts of `specmesh train image`, per device."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from services.core.config import LlamaConfig
from services.image.layout import Layout
from services.image.vq import VQConfig


@dataclass(frozen=True)
class ImageRecipe:
    # CPU defaults at one torch thread: 20 minutes in all on a 2-core Intel Xeon shared with
    # three other jobs (about 0.2-1 s per VQ step, 0.8-1 s per target step at batch 48)
    vq_steps: int = 500
    ar_steps: int = 1000
    draft_steps: int = 500
    judge_steps: int = 300
    batch: int = 48
    lr: float = 2e-3
    class_dropout: float = 0.1  # share of AR examples conditioned on the null class (for CFG)
    codebook_size: int = 128
    vq_channels: int = 48
    target_hidden: int = 128
    target_layers: int = 4
    # per-forward cost on CPU is mostly fixed overhead at these sizes, so a 2 x 64 draft costs
    # little more per step than 1 x 32 and agrees with the target more often
    draft_hidden: int = 64
    draft_layers: int = 2
    seed: int = 0

    @classmethod
    def for_device(cls, dev: torch.device, **overrides) -> ImageRecipe:
        """CPU defaults fit a few minutes on 2 cores; CUDA takes bigger batches and more steps."""
        base = (
            cls()
            if dev.type == "cpu"
            else cls(batch=256, vq_steps=3000, ar_steps=4000, draft_steps=3000, judge_steps=1000)
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def vq_config(self) -> VQConfig:
        return VQConfig(codebook_size=self.codebook_size, channels=self.vq_channels)

    def layout(self) -> Layout:
        return Layout(self.codebook_size)

    def ar_config(self, hidden: int, layers: int) -> LlamaConfig:
        heads = max(2, hidden // 32)
        return LlamaConfig(
            vocab_size=self.layout().vocab_size,
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=self.layout().tokens_per_image + 1,
            tie_word_embeddings=True,
        )

    def to_dict(self) -> dict:
        return asdict(self)
