"""Policy auto's choice, rule by rule: exact never gets a lossy policy."""

from __future__ import annotations

import pytest

from services.core.auto_policy import AutoSignals, choose_policy
from services.core.strategies import Policy


def signals(**kw) -> AutoSignals:
    base = dict(quality="exact", prompt_tokens=20, has_draft=True, draft_routes=True)
    return AutoSignals(**(base | kw))


@pytest.mark.parametrize(
    "kw, policy",
    [
        (dict(), Policy.SPECULATIVE),
        (dict(acceptance=0.1), Policy.TARGET),
        (dict(confidence=0.05), Policy.TARGET),
        (dict(has_draft=False, quality="fast"), Policy.TARGET),
        (dict(quality="high", divergence=0.1), Policy.R2R),
        (dict(quality="high", divergence=0.8), Policy.SPECULATIVE),
        (dict(quality="high", divergence=0.1, prompt_tokens=5000), Policy.SPECULATIVE),
        (dict(quality="high", divergence=0.1, draft_routes=False), Policy.SPECULATIVE),
        (dict(quality="fast", confidence=0.95), Policy.DRAFT),
        (dict(quality="fast", confidence=0.5), Policy.R2R),
        (dict(quality="fast", confidence=0.5, draft_routes=False), Policy.DRAFT),
    ],
)
def test_rules(kw, policy) -> None:
    chosen, reason = choose_policy(signals(**kw))
    assert chosen is policy and reason


def test_exact_is_never_lossy() -> None:
    for acceptance in (None, 0.0, 0.5, 1.0):
        for confidence in (None, 0.0, 0.5, 1.0):
            for divergence in (None, 0.0, 1.0):
                for prompt_tokens in (1, 10_000):
                    chosen, _ = choose_policy(
                        signals(
                            acceptance=acceptance,
                            confidence=confidence,
                            divergence=divergence,
                            prompt_tokens=prompt_tokens,
                        )
                    )
                    assert chosen in (Policy.TARGET, Policy.SPECULATIVE)
