"""The configurations a run compares, and the record of one timed request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.core.strategies import Strategy

TARGET_RUN = "target"
DRAFT_RUN = "draft"
HF_GENERATE = "hf_generate"
HF_ASSISTED = "hf_assisted"


@dataclass(frozen=True)
class RunConfig:
    name: str
    kind: str  # "stack" | "hf"
    policy: str | None = None  # stack: target | draft | speculative
    strategy: str | None = None  # speculative: one of STRATEGIES
    adaptive: bool = False
    lookup_tokens: int | None = None  # speculative: None = the gateway's default, 0 = off
    assisted: bool = False  # hf: assistant_model given

    @property
    def speculative(self) -> bool:
        return self.policy == "speculative"


def plan_runs(
    strategies: Sequence[str], *, adaptive: bool, draft_policy: bool, hf: bool, compare_lookup: bool = False
) -> list[RunConfig]:
    """compare_lookup: each model strategy also runs with lookup_tokens=0 (suffix ``:no-lookup``)."""
    runs = [RunConfig(TARGET_RUN, "stack", "target")]
    for s in strategies:
        variants = [(f"speculative:{s}", False)] + ([(f"speculative:{s}:adaptive", True)] if adaptive else [])
        for name, adapt in variants:
            runs.append(RunConfig(name, "stack", "speculative", s, adaptive=adapt))
            if compare_lookup and Strategy(s).uses_model:
                runs.append(
                    RunConfig(f"{name}:no-lookup", "stack", "speculative", s, adaptive=adapt, lookup_tokens=0)
                )
    if draft_policy:
        runs.append(RunConfig(DRAFT_RUN, "stack", "draft"))
    if hf:
        runs.append(RunConfig(HF_GENERATE, "hf"))
        runs.append(RunConfig(HF_ASSISTED, "hf", assisted=True))
    return runs


def rotate(runs: Sequence[RunConfig], k: int) -> list[RunConfig]:
    """`runs` starting at the k-th: prompt k's order, so no configuration always goes first."""
    k %= len(runs)
    return [*runs[k:], *runs[:k]]


@dataclass
class Record:
    """One timed request of one configuration on one prompt."""

    run: str
    set: str
    prompt_index: int
    prompt_tokens: int
    seed: int
    order: int  # position of this configuration among the prompt's runs (0 = first)
    tokens: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    rounds: int = 0  # stack: verification rounds; hf: target forward calls
    drafted: int = 0
    accepted: int = 0
    draft_forwards: int | None = None  # hf assisted: assistant forward calls
    cached_prompt_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def key(self) -> tuple[str, int]:
        return (self.set, self.prompt_index)
