"""Scoring features: pure functions over logits / log-probabilities, batched over ragged texts.

Layout of every batched input: logits or log-probs ``[B, T, V]`` padded on the right, the
scored tokens ``targets [B, T]`` and ``mask [B, T]`` (True = a real position). Row ``t`` of
text ``b`` is the distribution ``targets[b, t]`` was drawn from. Per-token outputs are
``[B, T]`` (0 at padding); sequence scores are ``[B]``.

- :mod:`.tokens`      per-token log-prob / rank / entropy / top-k of one sequence (TargetService.Score)
- :mod:`.features`    the per-token quantities every method is built from (batched)
- :mod:`.detection`   log-likelihood, log-rank, entropy, Binoculars, Fast-DetectGPT
- :mod:`.membership`  Min-K% Prob, Min-K%++, DC-PDD
- :mod:`.uncertainty` token probability, entropy, kurtosis; geometric / arithmetic means
- :mod:`.reference`   the token-frequency table DC-PDD calibrates against
- :mod:`.attribution` ReAGent input attribution, gradient x input and random baselines
- :mod:`.faithfulness` soft normalised sufficiency / comprehensiveness of an attribution
- :mod:`.dense_forward` an embeddings-in, differentiable forward of an engine's weights
"""

from services.core.scoring.tokens import TokenScores, token_scores

__all__ = ["TokenScores", "token_scores"]
