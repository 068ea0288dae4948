"""What one `bench spec` run measures: its options (checked once), run names and fixed notes."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.core.strategies import STRATEGY_NAMES

SCHEMA_VERSION = 1
STRATEGIES = STRATEGY_NAMES  # chain, static_tree, ... (services.core.strategies)
DEFAULT_TARGET = "smollm2-135m-instruct"
DEFAULT_DRAFT = "smollm2-135m-instruct-draft"
OMP_POLICIES = ("passive", "active", "inherit")

OVERHEAD_NOTE = (
    "specmesh runs go through the real gRPC stack: this process -> gateway -> draft and target "
    "services, each a separate process on loopback (with Redis when the stack starts it); their "
    "wall time is measured by the client and includes serialization, the process hops and the "
    "gateway's orchestration. transformers (hf_generate, hf_assisted) runs in this process with "
    "no RPC at all, target and assistant sharing one torch thread pool."
)
OMP_NOTE = (
    "OMP_WAIT_POLICY={policy} for this process (transformers) and every stack process: on a shared "
    "machine the OpenMP default (spin-waiting threads) collapses multi-threaded torch throughput "
    "whenever other processes compete for the cores (measured here: transformers generate with 2 "
    "threads at load ~5 ran at ~2 tokens/s spinning vs ~11 tokens/s passive); both sides get the "
    "same setting."
)
T_POSITIVE_NOTE = (
    "temperature > 0: outputs are samples, so speculative and target-only outputs legitimately "
    "differ (lossless means the same distribution, not the same tokens); greedy_identical is not "
    "checked. Runs that stop at EOS also differ in length, so compare speedup_vs_target_tokens_per_s "
    "(time per token) alongside speedup_vs_target (wall time for the same prompts)."
)
GATEWAY_NOTE = (
    "--gateway given: the stack was started elsewhere; its models, thread counts and default "
    "options (e.g. an --adaptive gateway makes every speculative run adaptive) are not "
    "controlled by this benchmark"
)


def normalize_strategy(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}")
    return key


@dataclass
class SpecBenchConfig:
    """The options of run_spec_bench (the `specmesh bench spec` flags), checked in __post_init__.

    Thread counts left None become the machine's core count (hf_threads: target_threads), so the
    JSON records what ran, not what was asked.
    """

    prompt_files: Sequence[str | Path]
    out: str | Path
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy: the run checks greedy identity
    gateway: str | None = None  # an address: use that stack instead of starting one
    target_model: str = DEFAULT_TARGET
    draft_model: str = DEFAULT_DRAFT
    strategies: Sequence[str] = STRATEGIES
    adaptive: bool = False  # also each strategy with the adaptive budget
    compare_lookup: bool = False  # also each model strategy with lookup_tokens=0
    draft_policy: bool = False  # also policy=draft
    limit: int | None = None  # first N prompts of each set
    seed: int = 0  # prompt i is sampled with seed + i by every configuration
    hf: bool = True  # the transformers baselines
    target_threads: int | None = None
    draft_threads: int | None = None
    draft_int8: bool = True
    target_weights: str = "fp32"  # serve target --weights: fp32 or q4_1
    omp_spincount: int | None = 10000  # GOMP_SPINCOUNT of the stack's services; None = OpenMP's
    hf_threads: int | None = None
    hf_num_assistant_tokens: int | None = None
    ignore_eos: bool = False
    redis: bool = True
    request_timeout: float = 600.0
    omp_wait_policy: str = "inherit"
    stack_log: str | Path | None = None
    progress: bool = True
    png: bool = True
    paths: list[Path] = field(init=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not self.prompt_files:
            raise ValueError("no prompt files")
        if self.target_weights not in ("fp32", "q4_1"):
            raise ValueError(f"target_weights must be fp32 or q4_1, got {self.target_weights!r}")
        if self.omp_wait_policy not in OMP_POLICIES:
            raise ValueError(
                f"omp_wait_policy must be one of {', '.join(OMP_POLICIES)}, got {self.omp_wait_policy!r}"
            )
        self.strategies = list(dict.fromkeys(normalize_strategy(s) for s in self.strategies))
        cores = os.cpu_count() or 1
        self.target_threads = self.target_threads or cores
        self.draft_threads = self.draft_threads or cores
        self.hf_threads = self.hf_threads or self.target_threads
        self.out = Path(self.out)
        self.paths = [Path(p) for p in self.prompt_files]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
