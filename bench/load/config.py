"""What one load benchmark run does."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LEVELS = (1, 8, 32)
MODES = {"both": (True, False), "on": (True,), "off": (False,)}


@dataclass
class LoadBenchConfig:
    out: Path
    concurrency: int = 32  # the highest level; the sweep is DEFAULT_LEVELS up to it
    duration_s: float = 60.0  # per level; streams still open then are cut off
    max_new_tokens: int = 32
    policies: tuple[str, ...] = ("target", "speculative")  # request i uses policies[i % len]
    batching: str = "both"  # run the stack with batching on, off, or both (one after the other)
    prompt_files: tuple[Path, ...] = (Path("bench/prompts/chat.jsonl"), Path("bench/prompts/code.jsonl"))
    target_model: str = "smollm2-135m-instruct"
    draft_model: str = "smollm2-135m-instruct-draft"
    target_threads: int | None = None
    draft_threads: int | None = None
    warmup_requests: int = 2  # per policy, before the resident memory "after warm-up" is read
    timeout_s: float = 600.0
    levels: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.duration_s <= 0 or self.max_new_tokens < 1:
            raise ValueError("concurrency, duration and max_new_tokens must be positive")
        if self.batching not in MODES:
            raise ValueError(f"batching must be one of {', '.join(MODES)}, got {self.batching!r}")
        levels = [c for c in DEFAULT_LEVELS if c < self.concurrency]
        self.levels = (*levels, self.concurrency)
