"""The draft recipe: every knob of a `specmesh train draft` run, saved verbatim in its report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from services.core.errors import InvalidArgument


@dataclass
class DraftRecipe:
    """Everything that defines a run; saved verbatim in train_report.json."""

    num_layers: int = 4  # draft depth
    keep_last: int = 0  # how many of them come from the END of the target (the rest from the start)
    draft_vocab_size: int = 16384  # 0 = full vocabulary
    top_k: int = 16  # stored target top-k per position
    seq_len: int = 256  # corpus chunk length
    corpus_batch: int = 8  # chunks per corpus step
    chat_batch: int = 16  # answers per chat step
    gen_batch: int = 48  # prompts decoded together by the target
    max_new_tokens: int = 128  # per generated chat answer
    sample_frac: float = 0.34  # share of chat answers sampled (the rest greedy)
    temperature: float = 0.8  # for the sampled answers
    gen_frac: float = 0.4  # share of the time budget spent generating chat answers
    chat_frac: float = 0.5  # share of training steps on chat answers (the rest on corpus)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    train_embeddings: bool = False
    n_eval: int = 32  # held-out chat prompts for alpha
    eval_max_new_tokens: int = 96
    eval_every_s: float = 180.0
    seed: int = 0
    max_steps: int = 0  # stop after this many training steps (0 = when the time budget is spent)

    @classmethod
    def for_device(cls, device: torch.device, **overrides: Any) -> DraftRecipe:
        if device.type == "cuda":
            base = dict(
                seq_len=512,
                corpus_batch=64,
                chat_batch=96,
                gen_batch=384,
                max_new_tokens=192,
                gen_frac=0.3,
                chat_frac=0.4,
                lr=6e-4,
                draft_vocab_size=16384,
                n_eval=64,
                eval_every_s=60.0,
            )
        else:
            base = dict(gen_batch=96)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def layer_indices(self, target_layers: int) -> list[int]:
        n = self.num_layers
        if not 1 <= n <= target_layers:
            raise InvalidArgument(f"--layers must be in [1, {target_layers}], got {n}", field="layers")
        last = min(self.keep_last, n - 1) if n > 1 else 0
        return list(range(n - last)) + list(range(target_layers - last, target_layers))
