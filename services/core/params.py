"""Request parameters as plain dataclasses (no torch import: the gateway validates with them too)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.core.errors import InvalidArgument, OutOfRange


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 (or 0) = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int, prefix: str = "sampling") -> None:
        if not 0.0 <= self.temperature <= 100.0:  # also rejects NaN
            raise InvalidArgument(f"must be in [0, 100], got {self.temperature}", f"{prefix}.temperature")
        if not 0 <= self.top_k <= vocab_size:
            raise InvalidArgument(f"must be in [0, {vocab_size}], got {self.top_k}", f"{prefix}.top_k")
        if not 0.0 <= self.top_p <= 1.0:
            raise InvalidArgument(f"must be in [0, 1], got {self.top_p}", f"{prefix}.top_p")


@dataclass(frozen=True)
class GenerationParams:
    sampling: SamplingConfig = SamplingConfig()
    max_new_tokens: int = 128
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def validate(
        self, *, vocab_size: int, prompt_len: int, max_context: int, prefix: str = "sampling"
    ) -> None:
        self.sampling.validate(vocab_size, prefix)
        room = max_context - prompt_len
        if self.max_new_tokens <= 0:
            raise InvalidArgument(f"must be >= 1, got {self.max_new_tokens}", f"{prefix}.max_new_tokens")
        if self.max_new_tokens > room:
            raise OutOfRange(
                f"{self.max_new_tokens} new tokens after a {prompt_len}-token prompt exceed the model "
                f"context of {max_context} (at most {max(room, 0)} allowed)",
                f"{prefix}.max_new_tokens",
            )
        for i, t in enumerate(self.stop_token_ids):
            if not 0 <= t < vocab_size:
                raise OutOfRange(
                    f"token id {t} at index {i} is outside [0, {vocab_size})", f"{prefix}.stop_token_ids"
                )
        for i, s in enumerate(self.stop_strings):
            if not s:
                raise InvalidArgument(f"stop string {i} is empty", f"{prefix}.stop")


MIN_KV_BUDGET = 8  # keys per layer and KV head: below this H2O keeps too little to be of use
# The paper splits half and half; with age-normalised scores a 75% window did better on
# validation texts (services.core.h2o).
DEFAULT_RECENT_SHARE = 0.75


@dataclass(frozen=True)
class KVBudget:
    """A request's H2O budget (services.core.h2o.H2OPolicy.of): at most max_tokens keys per
    layer and KV head, round(recent_share * max_tokens) of them the most recent."""

    max_tokens: int
    recent_share: float = DEFAULT_RECENT_SHARE

    @classmethod
    def checked(cls, max_tokens: int, recent_share: float, prefix: str = "kv_budget") -> KVBudget:
        """From wire values (recent_share 0 = the default); bad ones raise naming the field."""
        if max_tokens < MIN_KV_BUDGET:
            raise InvalidArgument(f"must be >= {MIN_KV_BUDGET}, got {max_tokens}", f"{prefix}.max_tokens")
        if not 0.0 <= recent_share <= 1.0:  # also rejects NaN
            raise InvalidArgument(
                f"must be in (0, 1] (0 = {DEFAULT_RECENT_SHARE}), got {recent_share}",
                f"{prefix}.recent_share",
            )
        return cls(max_tokens, recent_share or DEFAULT_RECENT_SHARE)
