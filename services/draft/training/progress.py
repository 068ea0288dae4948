"""A run's time budget and its progress bar (seconds of the budget spent)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Budget:
    start: float  # time.time() when labelling and training began
    seconds: float

    @property
    def deadline(self) -> float:
        return self.start + self.seconds

    def at(self, frac: float) -> float:
        """The time.time() value when `frac` of the budget is spent."""
        return self.start + frac * self.seconds

    def elapsed_minutes(self) -> float:
        return (time.time() - self.start) / 60


class Progress:
    """A tqdm bar over the budget; `write` prints a line without breaking it."""

    def __init__(self, budget: Budget, enabled: bool) -> None:
        from tqdm import tqdm

        self.budget = budget
        total = int(budget.seconds)
        self._bar = tqdm(total=total, unit="s", desc="draft", disable=not enabled, dynamic_ncols=True)

    def phase(self, description: str) -> None:
        self._bar.set_description(description)

    def tick(self, **postfix: Any) -> None:
        self._bar.n = min(int(time.time() - self.budget.start), int(self.budget.seconds))
        self._bar.set_postfix(postfix, refresh=True)

    def write(self, line: str) -> None:
        self._bar.write(line)

    def close(self) -> None:
        self._bar.n = int(self.budget.seconds)
        self._bar.close()
