"""transformers in this process: the plain and assisted-generation baselines, and the reference
logits the greedy identity check reads margins from."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.spec.runs import Record


class _CallCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        self.calls += 1


class HFRunner:
    """transformers' LlamaForCausalLM.generate, plain and with ``assistant_model`` (the draft)."""

    def __init__(
        self,
        target_dir: Path,
        draft_dir: Path,
        *,
        threads: int,
        temperature: float,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        ignore_eos: bool,
        attn_implementation: str = "sdpa",
        num_assistant_tokens: int | None = None,
    ) -> None:
        import torch
        import transformers

        torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()

        def load(d: Path) -> Any:
            return transformers.LlamaForCausalLM.from_pretrained(
                d, dtype=torch.float32, attn_implementation=attn_implementation
            ).eval()

        self.target = load(target_dir)
        self.draft = load(draft_dir)
        eos = None if ignore_eos else list(eos_token_ids)
        for m in (self.target, self.draft):
            m.generation_config.eos_token_id = eos
            m.generation_config.pad_token_id = pad_token_id
        if num_assistant_tokens is not None:
            self.draft.generation_config.num_assistant_tokens = num_assistant_tokens
        sample = temperature > 0
        kwargs: dict[str, Any] = {
            "do_sample": sample,
            "max_new_tokens": max_new_tokens,
            "eos_token_id": eos,
            "pad_token_id": pad_token_id,
            "use_cache": True,
        }
        if sample:
            # top_k=0: transformers otherwise applies its default top_k=50, which the stack does not.
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        self.generation_config = transformers.GenerationConfig(**kwargs)
        self.generate_kwargs = kwargs
        self.threads = threads
        self.attn_implementation = self.target.config._attn_implementation
        defaults = transformers.GenerationConfig._get_default_generation_params()
        gc_draft = self.draft.generation_config
        keys = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
        self.assisted_settings = {
            k: getattr(gc_draft, k, None) if getattr(gc_draft, k, None) is not None else defaults.get(k)
            for k in keys
        }
        self._target_calls, self._draft_calls = _CallCounter(), _CallCounter()
        self.target.register_forward_hook(self._target_calls)
        self.draft.register_forward_hook(self._draft_calls)

    def generate(self, prompt_ids: Sequence[int], seed: int, assisted: bool, record: Record) -> Record:
        import torch

        x = torch.tensor([list(prompt_ids)])
        self._target_calls.calls = self._draft_calls.calls = 0
        kwargs = {"assistant_model": self.draft} if assisted else {}
        try:
            with torch.inference_mode():
                torch.manual_seed(seed)
                t0 = time.perf_counter()
                out = self.target.generate(
                    x, attention_mask=torch.ones_like(x), generation_config=self.generation_config, **kwargs
                )
                record.wall_s = time.perf_counter() - t0
        except Exception as exc:  # a transformers failure must not lose the stack's results
            record.error = f"{type(exc).__name__}: {exc}"
            return record
        record.tokens = out[0, len(prompt_ids) :].tolist()
        record.rounds = self._target_calls.calls
        record.draft_forwards = self._draft_calls.calls if assisted else None
        eos = self.generate_kwargs["eos_token_id"] or []
        record.finish_reason = "eos" if record.tokens and record.tokens[-1] in eos else "length"
        return record


def load_hf_target(target_dir: Path) -> Any:
    """The target as transformers loads it, fp32 (the reference the parity tests compare to)."""
    import torch
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()


def hf_next_logits(model: Any) -> Callable[[list[int]], list[float]]:
    """`next_logits` for identity.add_logit_margins from a transformers causal LM (fp32, one full
    forward): an arithmetic independent of both specmesh paths, so it shows how close the two
    tokens are."""
    import torch

    def next_logits(ids: list[int]) -> list[float]:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0, -1].float().tolist()

    return next_logits
