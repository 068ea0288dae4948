"""Where a routed chain is cut (R2R, arXiv 2505.21600): torch-free, so the gateway shares it."""

from __future__ import annotations


def routed(divergence: list[float], threshold: float) -> int:
    """How many of a chain's tokens the small model keeps: the index of the first token whose
    divergence probability exceeds `threshold` (that one goes to the large model), or the
    chain's length when none does."""
    return next((i for i, d in enumerate(divergence) if d > threshold), len(divergence))
