"""Policy `auto`: choose a request's policy from cheap signals, in the spirit of DiffAdapt
("Difficulty-Adaptive Reasoning for Token-Efficient LLM Inference", where a small probe on the
final hidden state picks the strategy). Here the probe is the draft itself: a few greedy draft
tokens give its confidence (the probability it puts on its own tokens) and, when it serves a
router, the router's divergence scores (a probe on the draft's final hidden state); the gateway
adds the path acceptance measured on its recent speculative requests and the prompt's length.

The rules, by requested quality (``Quality`` in gateway.proto):

* EXACT (and unspecified): only lossless policies. ``speculative`` unless the measured
  acceptance is so low (< MIN_ACCEPTANCE) or the draft so unsure of this prompt
  (< MIN_EXACT_CONFIDENCE) that verifying its tokens would cost more than it saves: ``target``.
* HIGH: ``r2r`` on easy prompts (mean divergence <= EASY_DIVERGENCE: the router expects to
  send few tokens to the target) that are not long (a long prompt makes the target's catch-up
  prefill the dominant cost either way); ``speculative`` otherwise (exact output).
* FAST: ``draft`` when the draft is sure of the prompt (confidence >= SURE_CONFIDENCE), else
  ``r2r`` (``draft`` when there is no router).

Without a draft every quality gets ``target``. Torch-free: the gateway calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.core.strategies import Policy

MIN_ACCEPTANCE = 0.3  # chain path acceptance below which speculative decoding loses on CPU
MIN_EXACT_CONFIDENCE = 0.2
EASY_DIVERGENCE = 0.35
SURE_CONFIDENCE = 0.9
LONG_PROMPT = 1024  # tokens


@dataclass(frozen=True)
class AutoSignals:
    quality: str  # "exact" | "high" | "fast"
    prompt_tokens: int
    has_draft: bool
    draft_routes: bool  # the draft serves a token router
    confidence: float | None = None  # mean draft probability of its own probe tokens
    divergence: float | None = None  # mean router divergence of the probe tokens
    acceptance: float | None = None  # recent speculative path acceptance (None: none measured)


def choose_policy(s: AutoSignals) -> tuple[Policy, str]:
    """The policy for a request and the reason, in words (returned to the client and traced)."""
    if not s.has_draft:
        return Policy.TARGET, "no draft service is available"
    if s.quality == "exact":
        if s.acceptance is not None and s.acceptance < MIN_ACCEPTANCE:
            return Policy.TARGET, (
                f"exact: recent speculative acceptance {s.acceptance:.2f} < {MIN_ACCEPTANCE}, "
                "verifying drafts would cost more than it saves"
            )
        if s.confidence is not None and s.confidence < MIN_EXACT_CONFIDENCE:
            return Policy.TARGET, (
                f"exact: the draft is unsure of this prompt (confidence {s.confidence:.2f} < "
                f"{MIN_EXACT_CONFIDENCE})"
            )
        return Policy.SPECULATIVE, "exact: speculative decoding keeps the target's output"
    if s.quality == "high":
        if not s.draft_routes:
            return Policy.SPECULATIVE, "high: the draft has no router, speculative keeps the target's output"
        if s.prompt_tokens > LONG_PROMPT:
            return Policy.SPECULATIVE, (
                f"high: a long prompt ({s.prompt_tokens} tokens) makes the target's catch-up dominate"
            )
        if s.divergence is not None and s.divergence <= EASY_DIVERGENCE:
            return (
                Policy.R2R,
                f"high: an easy prompt (mean divergence {s.divergence:.2f} <= {EASY_DIVERGENCE})",
            )
        return Policy.SPECULATIVE, (
            "high: a hard prompt for the draft"
            + (f" (mean divergence {s.divergence:.2f})" if s.divergence is not None else "")
        )
    if s.confidence is not None and s.confidence >= SURE_CONFIDENCE:
        return Policy.DRAFT, f"fast: the draft is sure of this prompt (confidence {s.confidence:.2f})"
    if s.draft_routes:
        return Policy.R2R, "fast: the draft generates, the router sends divergent tokens to the target"
    return Policy.DRAFT, "fast: the draft has no router, so it generates alone"
