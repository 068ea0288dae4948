"""Summaries of one concurrency level: latency percentiles, throughput, error counts."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Stream:
    """One streaming request as the client saw it."""

    policy: str
    prompt_tokens: int
    start: float  # perf_counter when the request was sent
    first: float | None = None  # when the first chunk with tokens arrived
    last: float | None = None  # when the last chunk with tokens arrived
    end: float | None = None  # when the stream finished, failed or was cut off
    tokens: int = 0
    error: str | None = None  # gRPC status name of a failed stream
    cut: bool = False  # still streaming when the level's time was up: cancelled by the client

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def per_token(self) -> float | None:
        """Time per output token after the first (the GenAI time_per_output_token)."""
        if self.first is None or self.last is None or self.tokens < 2:
            return None
        return (self.last - self.first) / (self.tokens - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize_level(concurrency: int, streams: Sequence[Stream], elapsed_s: float) -> dict:
    """Tokens/s counts the tokens that arrived within `elapsed_s` (the level's window), those of
    streams cut off at its end included; latencies come from every stream that got that far."""
    ok = [s for s in streams if s.error is None]
    ttft = [s.ttft for s in ok if s.ttft is not None]
    tpot = [s.per_token for s in ok if s.per_token is not None]
    tokens = sum(s.tokens for s in ok)
    ms = 1000.0

    def pct(xs: list[float], q: float) -> float | None:
        p = percentile(xs, q)
        return None if p is None else round(p * ms, 2)

    return {
        "concurrency": concurrency,
        "requests": len(streams),
        "completed": sum(1 for s in ok if not s.cut),
        "cut_at_end": sum(1 for s in ok if s.cut),
        "errors": len(streams) - len(ok),
        "error_codes": dict(Counter(s.error for s in streams if s.error is not None)),
        "output_tokens": tokens,
        "elapsed_s": round(elapsed_s, 3),
        "tokens_per_s": round(tokens / elapsed_s, 2) if elapsed_s > 0 else None,
        "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
        "per_token_ms": {"p50": pct(tpot, 50), "p99": pct(tpot, 99)},
        "by_policy": {
            p: sum(s.tokens for s in ok if s.policy == p) for p in sorted({s.policy for s in streams})
        },
    }


def gain(levels: Sequence[dict], high: int, low: int = 1) -> float | None:
    """Aggregate tokens/s at `high` concurrent streams over that at `low`, same run."""
    by = {lv["concurrency"]: lv["tokens_per_s"] for lv in levels}
    if not by.get(low) or by.get(high) is None:
        return None
    return round(by[high] / by[low], 3)
